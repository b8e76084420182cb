//! A **test** Kubernetes API server. It is not a cluster: it keeps objects in memory
//! (namespaces, pods, configmaps, secrets, services, service accounts, PVCs,
//! deployments, RBAC roles and bindings, PDBs) and serves discovery, list, get, create,
//! update, merge and server-side-apply patches, delete, watch streaming (with
//! selectors), pod logs (with `follow`), `exec`, `attach` and `portforward` over
//! WebSocket and SPDY (with a small file system per pod for `kubectl cp`). Small
//! controllers roll deployments out and move pods through their phases
//! ([`controllers`]). It records the identity and impersonation headers of every
//! request so tests can assert them.
//!
//! Tokens map to users: the agent's token (a ServiceAccount) and any the test adds.
//! With [`Options::rbac`] it authorizes every request and every impersonation with
//! RBAC, as kube-apiserver does ([`rbac`]); without it any authenticated request is
//! allowed. Test-only endpoints live under `/_test/` ([`testing`]).

pub mod controllers;
mod exec;
mod portforward;
mod process;
pub mod rbac;
pub mod resources;
pub mod spdy;
mod store;
mod testing;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
pub use rbac::User;
use resources::Target;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{Event, Params, Store};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// The identity the server assigns to the agent's token.
pub const SERVICE_ACCOUNT: &str = "system:serviceaccount:gitlab-agent:agentk";

/// One request as the server saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The authenticated user, or empty when unauthenticated.
    pub authenticated_as: String,
    pub impersonate_user: Option<String>,
    pub impersonate_uid: Option<String>,
    pub impersonate_groups: Vec<String>,
    /// Keys decoded and lowercased, as Kubernetes does.
    pub impersonate_extra: BTreeMap<String, Vec<String>>,
    /// The WebSocket subprotocols offered, in order.
    pub websocket_protocols: Vec<String>,
    /// The `Upgrade` header (`websocket`, `SPDY/3.1`), when the client asked for one.
    pub upgrade: Option<String>,
    /// The `Authorization` header that arrived (the agent's own credentials).
    pub authorization: Option<String>,
    /// The status the server answered (0 while a stream is open).
    pub code: u16,
}

/// How the server behaves.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Authorize requests and impersonation with RBAC (as kube-apiserver does).
    pub rbac: bool,
    /// Serve HTTPS (with a CA of its own, in its kubeconfigs): kubectl sends bearer
    /// tokens only over TLS.
    pub tls: bool,
    /// Accept EKS tokens, as an EKS cluster's API does.
    pub eks: Option<EksAuth>,
}

/// How the test API server authenticates EKS bearer tokens (`k8s-aws-v1.` and the
/// base64url of a presigned STS GetCallerIdentity URL). EKS calls that URL; moto cannot
/// answer presigned requests with its authentication on, so this server checks the
/// token itself, as strictly: the URL is a GetCallerIdentity at `sts_url`, presigned
/// for 60 s with the `x-k8s-aws-id: <cluster>` header signed, not expired, and its
/// SigV4 signature is right for an assumed role's credentials recorded by moto
/// (`moto_state`: its `/moto-api/data.json`). The caller is the cluster's creator,
/// so `system:masters`.
#[derive(Debug, Clone)]
pub struct EksAuth {
    pub sts_url: String,
    pub cluster: String,
    pub moto_state: String,
}

async fn eks_user(auth: &EksAuth, token: &str) -> Option<User> {
    use base64::Engine;
    let raw = token.strip_prefix("k8s-aws-v1.")?;
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .ok()?;
    let url = String::from_utf8(url).ok()?;
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(url.split_once('?')?.1.as_bytes())
            .into_owned()
            .collect();
    let q = |k: &str| query.get(k).map(String::as_str);
    let signed_at = crate::time::from_amz_date(q("X-Amz-Date")?)?;
    let fresh = (0..=60).contains(&(crate::time::now_secs() - signed_at));
    let shaped = url.starts_with(&format!(
        "{}?Action=GetCallerIdentity&Version=2011-06-15&",
        auth.sts_url
    )) && q("X-Amz-Expires") == Some("60")
        && q("X-Amz-SignedHeaders") == Some("host;x-k8s-aws-id");
    if !fresh || !shaped {
        return None;
    }
    let key_id = q("X-Amz-Credential")?.split('/').next()?;
    let region = q("X-Amz-Credential")?.split('/').nth(2)?;
    // The assumed role's credentials, as moto recorded them.
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let resp = client.get(auth.moto_state.parse().ok()?).await.ok()?;
    let state: Value =
        serde_json::from_slice(&resp.into_body().collect().await.ok()?.to_bytes()).ok()?;
    let role = state["sts"]["AssumedRole"]
        .as_array()?
        .iter()
        .find(|r| r["access_key_id"] == key_id)?
        .clone();
    let expected = presign(&auth.sts_url, &auth.cluster, region, &role, signed_at)?;
    (expected == url).then(|| User {
        name: role["arn"].as_str().unwrap_or_default().to_string(),
        uid: String::new(),
        groups: vec!["system:masters".into(), "system:authenticated".into()],
        extra: BTreeMap::new(),
    })
}

/// The presigned URL the credentials of `role` give at `at`.
fn presign(sts_url: &str, cluster: &str, region: &str, role: &Value, at: i64) -> Option<String> {
    use aws_sigv4::http_request::{
        sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    };
    let identity: aws_smithy_runtime_api::client::identity::Identity =
        aws_credential_types::Credentials::new(
            role["access_key_id"].as_str()?,
            role["secret_access_key"].as_str()?,
            role["session_token"].as_str().map(str::to_string),
            None,
            "moto",
        )
        .into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(Duration::from_secs(60));
    let time = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(at).ok()?);
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(time)
        .settings(settings)
        .build()
        .ok()?
        .into();
    let base = format!("{sts_url}?Action=GetCallerIdentity&Version=2011-06-15");
    let signable = SignableRequest::new(
        "GET",
        &base,
        std::iter::once(("x-k8s-aws-id", cluster)),
        SignableBody::Bytes(&[]),
    )
    .ok()?;
    let (instructions, _) = sign(signable, &params).ok()?.into_parts();
    let mut req = Request::get(&base)
        .header("x-k8s-aws-id", cluster)
        .body(())
        .ok()?;
    instructions.apply_to_request_http1x(&mut req);
    Some(req.uri().to_string())
}

pub(crate) struct State {
    tokens: Mutex<HashMap<String, User>>,
    rbac: bool,
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    recorded: Mutex<Vec<Recorded>>,
    active_streams: watch::Sender<usize>,
    files: process::Files,
    bytes_served: std::sync::atomic::AtomicU64,
    /// What tests planned for pods they expect others to create, by namespace and name.
    pod_plans: Mutex<HashMap<(String, String), PodPlan>>,
    eks: Option<EksAuth>,
}

/// What a pod created later will do (see [`TestApiServer::plan_pod`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct PodPlan {
    /// `<Phase>@<ms>,...`, as the phases annotation takes it.
    pub phases: Option<String>,
    /// The container's whole log.
    pub log: Option<String>,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn planned(&self, ns: &str, name: &str) -> Option<PodPlan> {
        self.pod_plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }
}

/// A running test API server; dropping it stops it.
pub struct TestApiServer {
    pub addr: SocketAddr,
    /// The agent's token (a ServiceAccount, [`SERVICE_ACCOUNT`]).
    pub token: String,
    /// The CA of its certificate, when it serves HTTPS.
    pub ca_pem: Option<String>,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct StreamGuard(Arc<State>);

impl StreamGuard {
    fn new(s: &Arc<State>) -> Self {
        s.active_streams.send_modify(|n| *n += 1);
        StreamGuard(s.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0
            .active_streams
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

fn tls_acceptor(c: &crate::certs::LocalhostCert) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut c.cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut c.key.as_bytes())?
        .ok_or_else(|| std::io::Error::other("no key"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(std::io::Error::other)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

fn new_token() -> String {
    format!(
        "test-token-{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

impl TestApiServer {
    /// Starts on `127.0.0.1:0` with a random agent token, without RBAC.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Starts on `127.0.0.1:0` with a random agent token.
    pub async fn start_with(opts: Options) -> std::io::Result<Self> {
        let token = format!("test-sa-token-{:016x}", rand::random::<u64>());
        Self::start_on_with(TcpListener::bind("127.0.0.1:0").await?, token, opts).await
    }

    /// Starts on a bound listener with the given agent token, without RBAC.
    pub async fn start_on(listener: TcpListener, token: String) -> std::io::Result<Self> {
        Self::start_on_with(listener, token, Options::default()).await
    }

    /// Starts on a bound listener with the given agent token.
    pub async fn start_on_with(
        listener: TcpListener,
        token: String,
        opts: Options,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(1024);
        let tokens = HashMap::from([(
            token.clone(),
            User::service_account("gitlab-agent", "agentk"),
        )]);
        let state = Arc::new(State {
            tokens: Mutex::new(tokens),
            rbac: opts.rbac,
            store: Mutex::new(Store::seeded()),
            events,
            recorded: Mutex::new(Vec::new()),
            active_streams: watch::channel(0).0,
            files: Default::default(),
            bytes_served: Default::default(),
            pod_plans: Default::default(),
            eks: opts.eks.clone(),
        });
        let cert = opts.tls.then(crate::certs::LocalhostCert::generate);
        let acceptor = match &cert {
            Some(c) => Some(tls_acceptor(c)?),
            None => None,
        };
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let s = s.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(s, req).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = builder
                                    .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await;
                        }
                    }
                });
            }
        });
        Ok(TestApiServer {
            addr,
            token,
            ca_pem: cert.map(|c| c.ca),
            state,
            task,
        })
    }

    /// The CA of its certificate (PEM), when it serves HTTPS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Base URL (`http://127.0.0.1:port`, or https).
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// A kubeconfig for the agent: this server and its token.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_for(&self.token)
    }

    /// A kubeconfig for this server with `token`.
    pub fn kubeconfig_for(&self, token: &str) -> String {
        use base64::Engine;
        let ca = self
            .ca_pem
            .as_ref()
            .map(|c| {
                format!(
                    "    certificate-authority-data: {}\n",
                    base64::engine::general_purpose::STANDARD.encode(c)
                )
            })
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test-apiserver\n  cluster:\n    server: {}\n{ca}contexts:\n- name: test\n  context:\n    cluster: test-apiserver\n    user: agentk\ncurrent-context: test\nusers:\n- name: agentk\n  user:\n    token: {token}\n",
            self.url(),
        )
    }

    /// A new token that authenticates as `user`.
    pub fn add_token(&self, user: User) -> String {
        let t = new_token();
        self.state
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(t.clone(), user);
        t
    }

    /// A kubeconfig for a cluster administrator (`system:masters`).
    pub fn admin_kubeconfig(&self) -> String {
        let t = self.add_token(User::admin());
        self.kubeconfig_for(&t)
    }

    /// Every request recorded so far.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.state
            .recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests recorded for paths starting with `prefix`.
    pub fn recorded_for(&self, prefix: &str) -> Vec<Recorded> {
        self.recorded()
            .into_iter()
            .filter(|r| r.path.starts_with(prefix))
            .collect()
    }

    /// Creates a running pod, notifying watchers.
    pub fn create_pod(&self, ns: &str, name: &str) {
        let mut st = self.state.lock();
        st.rv += 1;
        let rv = st.rv;
        let mut o = store::running_pod(name, ns);
        o["metadata"]["resourceVersion"] = json!(rv.to_string());
        o["metadata"]["uid"] = json!(format!("pod-{rv}"));
        o["metadata"]["creationTimestamp"] = json!(crate::time::rfc3339(crate::time::now_secs()));
        st.objects
            .entry("/pods".into())
            .or_default()
            .insert((ns.into(), name.into()), o.clone());
        drop(st);
        let _ = self.state.events.send(Event {
            key: "/pods".into(),
            namespace: ns.into(),
            change: "ADDED",
            object: o,
        });
    }

    /// Plans a pod someone else will create as `ns/name`: its phases (`<Phase>@<ms after
    /// creation>,...`, e.g. `Running@50,Failed@300`; `Running@50` runs until
    /// [`TestApiServer::set_pod_phase`]) and its log. Each creation under the name follows
    /// the plan in force then.
    pub fn plan_pod(&self, ns: &str, name: &str, phases: &str, log: &str) {
        self.state
            .pod_plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                (ns.to_string(), name.to_string()),
                PodPlan {
                    phases: Some(phases.to_string()),
                    log: Some(log.to_string()),
                },
            );
    }

    /// Moves an existing pod to `phase` now (`Succeeded`, `Failed`...).
    pub fn set_pod_phase(&self, ns: &str, name: &str, phase: &str) -> bool {
        let Some(rt) = resources::find("", "pods") else {
            return false;
        };
        let Some(current) = self.state.lock().get(&rt.key(), ns, name).cloned() else {
            return false;
        };
        let status = controllers::pod_status(phase, &current);
        store::write(
            &self.state,
            rt,
            ns,
            name,
            json!({"status": status}),
            store::Write::Replace,
            true,
            false,
        )
        .is_ok()
    }

    /// An object as stored (`group` empty for the core group), if it exists.
    pub fn object(&self, group: &str, resource: &str, ns: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .get(&format!("{group}/{resource}"), ns, name)
            .cloned()
    }

    /// Bytes handed to the network by `/_test/bytes` so far.
    pub fn bytes_served(&self) -> u64 {
        self.state
            .bytes_served
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Watches the number of streaming responses (watches, follows, `/_test/stream`)
    /// currently open.
    pub fn active_streams(&self) -> watch::Receiver<usize> {
        self.state.active_streams.subscribe()
    }
}

fn full(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type
            .parse()
            .unwrap_or(header::HeaderValue::from_static("application/json")),
    );
    r
}

fn json_resp(code: StatusCode, v: &Value) -> Response<Body> {
    full(code, "application/json", v.to_string())
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_resp(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn query_params(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

/// The impersonation a request asks for (extra keys decoded and lowercased).
fn requested(req: &Request<Incoming>) -> rbac::Requested {
    let h = req.headers();
    let all = |name: &str| -> Vec<String> {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect()
    };
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in h {
        if let Some(k) = name.as_str().strip_prefix("impersonate-extra-") {
            let key = percent_encoding::percent_decode_str(&k.to_ascii_lowercase())
                .decode_utf8_lossy()
                .into_owned();
            extra
                .entry(key)
                .or_default()
                .push(value.to_str().unwrap_or_default().to_string());
        }
    }
    rbac::Requested {
        user: all("impersonate-user").into_iter().next(),
        uid: all("impersonate-uid").into_iter().next(),
        groups: all("impersonate-group"),
        extra,
    }
}

fn record(state: &State, req: &Request<Incoming>, user: Option<&User>, imp: &rbac::Requested) {
    let all = |name: &str| -> Vec<String> {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect()
    };
    let r = Recorded {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().unwrap_or_default().to_string(),
        authenticated_as: user.map(|u| u.name.clone()).unwrap_or_default(),
        impersonate_user: imp.user.clone(),
        impersonate_uid: imp.uid.clone(),
        impersonate_groups: imp.groups.clone(),
        impersonate_extra: imp.extra.clone(),
        websocket_protocols: all("sec-websocket-protocol")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect(),
        upgrade: all("upgrade").into_iter().next(),
        authorization: all("authorization").into_iter().next(),
        code: 0,
    };
    state
        .recorded
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(r);
}

/// The verb of a request on `target`, as RBAC names it.
fn verb(method: &Method, target: &Target, p: &Params) -> &'static str {
    let object = !matches!(target, Target::Collection { .. });
    match *method {
        Method::GET if matches!(p.get("watch"), Some("true" | "1")) => "watch",
        Method::GET
            if matches!(
                target,
                Target::Sub {
                    sub: "exec" | "attach" | "portforward",
                    ..
                }
            ) =>
        {
            "create"
        }
        Method::GET if object => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "get",
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let user = match (bearer, &state.eks) {
        (Some(t), Some(eks)) if t.starts_with("k8s-aws-v1.") => eks_user(eks, &t).await,
        (Some(t), _) => state
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&t)
            .cloned(),
        (None, _) => None,
    };
    let imp = requested(&req);
    record(&state, &req, user.as_ref(), &imp);
    let Some(user) = user else {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    };
    // The user the request runs as: the impersonated one, when allowed.
    let acting = if state.rbac && !imp.is_empty() {
        let checked = rbac::impersonate(&state.lock(), &user, &imp);
        match checked {
            Ok(u) => u,
            Err(message) => return status(StatusCode::FORBIDDEN, "Forbidden", &message),
        }
    } else {
        user
    };
    let path = req.uri().path().trim_end_matches('/').to_string();
    let params = Params(query_params(req.uri().query().unwrap_or_default()));
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Any request may ask to be slow (a cluster under load), for caching tests.
    if let Some(ms) = params.get("_delay_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let method = req.method().clone();
    match (&method, segs.as_slice()) {
        (&Method::GET, ["version"]) => json_resp(
            StatusCode::OK,
            &json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-kas-test-apiserver", "platform": "linux/amd64"}),
        ),
        (&Method::GET, ["api"]) => json_resp(StatusCode::OK, &resources::core_versions()),
        (&Method::GET, ["apis"]) => json_resp(StatusCode::OK, &resources::groups()),
        (&Method::GET, ["api", "v1"]) => discovery(resources::resource_list("")),
        (&Method::GET, ["apis", g, "v1"]) => discovery(resources::resource_list(g)),
        (&Method::GET, ["openapi", "v3"]) => json_resp(StatusCode::OK, &resources::openapi_index()),
        (&Method::GET, ["openapi", "v3", "api", "v1"]) => discovery(resources::openapi("")),
        (&Method::GET, ["openapi", "v3", "apis", g, "v1"]) => discovery(resources::openapi(g)),
        (_, ["_test", what]) => {
            let what = what.to_string();
            let p = params.0.clone();
            let param = move |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            testing::handle(&state, req, &what, &param).await
        }
        _ => match resources::target(&segs) {
            Some(t) => resource(&state, req, t, &acting, &params).await,
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            ),
        },
    }
}

fn discovery(doc: Option<Value>) -> Response<Body> {
    match doc {
        Some(d) => json_resp(StatusCode::OK, &d),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

/// A request on a resource: authorized (with RBAC), then served.
async fn resource(
    state: &Arc<State>,
    req: Request<Incoming>,
    target: Target<'_>,
    user: &User,
    p: &Params,
) -> Response<Body> {
    let method = req.method().clone();
    let (rt, ns, name, sub) = match &target {
        Target::Collection { rt, ns } => (*rt, ns.unwrap_or(""), "", ""),
        Target::Object { rt, ns, name } => (*rt, *ns, *name, ""),
        Target::Sub { rt, ns, name, sub } => (*rt, *ns, *name, *sub),
    };
    if state.rbac {
        let a = rbac::Attributes {
            verb: verb(&method, &target, p),
            group: rt.group,
            resource: rt.resource,
            subresource: sub,
            namespace: ns,
            name,
        };
        if !rbac::authorize(&state.lock(), user, &a) {
            return status(StatusCode::FORBIDDEN, "Forbidden", &a.forbidden(user));
        }
    }
    match target {
        Target::Sub {
            sub: sub @ ("exec" | "attach"),
            ..
        } => return exec::exec(state, req, (ns, name), sub == "attach", &p.0),
        Target::Sub {
            sub: "portforward", ..
        } => return portforward::portforward(state, req, (ns, name)),
        Target::Sub { sub: "log", .. } => {
            return exec::logs(state, ns, name, p.get("follow") == Some("true"))
        }
        _ => {}
    }
    let headers = req.headers().clone();
    let protobuf = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("protobuf"));
    if protobuf {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "this test server reads JSON and YAML bodies only, not protobuf",
        );
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return status(StatusCode::BAD_REQUEST, "BadRequest", "cannot read body"),
    };
    match target {
        Target::Collection { rt, ns } => {
            store::collection(state, &method, &headers, body, rt, ns, p).await
        }
        Target::Object { rt, ns, name } => {
            store::object(state, &method, &headers, body, rt, ns, name, false, p).await
        }
        Target::Sub {
            rt,
            ns,
            name,
            sub: "status",
        } => store::object(state, &method, &headers, body, rt, ns, name, true, p).await,
        Target::Sub {
            ns,
            name,
            sub: "token",
            ..
        } if method == Method::POST => token_request(state, ns, name),
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "this test server does not serve that subresource",
        ),
    }
}

/// `POST .../serviceaccounts/<name>/token`: a token for the service account.
fn token_request(state: &Arc<State>, ns: &str, name: &str) -> Response<Body> {
    if state.lock().get("/serviceaccounts", ns, name).is_none() {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("serviceaccounts \"{name}\" not found"),
        );
    }
    let t = new_token();
    state
        .tokens
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(t.clone(), User::service_account(ns, name));
    let expires = crate::time::rfc3339(crate::time::now_secs() + 3600);
    json_resp(
        StatusCode::CREATED,
        &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "metadata": {"name": name, "namespace": ns},
            "spec": {"audiences": [], "expirationSeconds": 3600}, "status": {"token": t, "expirationTimestamp": expires}}),
    )
}
