//! A **test** Kubernetes API server. It is not a cluster: it keeps namespaces, pods and
//! configmaps in memory (plus fixed, read-only `apps/v1` deployments and
//! `rbac.authorization.k8s.io/v1` cluster roles) and serves discovery, list/get/create/update/patch/delete,
//! watch streaming, pod logs (with `follow`), and `exec` over WebSocket
//! (`v5.channel.k8s.io`/`v4.channel.k8s.io`, echoing stdin). It authenticates one
//! bearer token (the agent's ServiceAccount) and records the identity and
//! impersonation headers of every request so tests can assert them.
//!
//! Test-only endpoints under `/_test/`: `bytes?n=N` (a streamed body of N bytes),
//! `abort` (64 KiB, then the body fails),
//! `stream` (an endless slow body), `echo` (POST: streams the request body back),
//! `slow?ms=N` (answers after N ms, default 2000); any request with `_delay_ms=N` in
//! its query is answered N ms late,
//! `requests` (the recorded requests as JSON).

use crate::time::{now_secs, rfc3339};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// The identity the server assigns to its bearer token.
pub const SERVICE_ACCOUNT: &str = "system:serviceaccount:gitlab-agent:agentk";

/// One request as the server saw it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The authenticated user (the service account), or empty when unauthenticated.
    pub authenticated_as: String,
    pub impersonate_user: Option<String>,
    pub impersonate_uid: Option<String>,
    pub impersonate_groups: Vec<String>,
    /// Keys decoded and lowercased, as Kubernetes does.
    pub impersonate_extra: BTreeMap<String, Vec<String>>,
    /// The WebSocket subprotocols offered, in order.
    pub websocket_protocols: Vec<String>,
    /// Whether an `Authorization` header arrived (the agent's own credentials).
    pub authorization: Option<String>,
}

struct Store {
    rv: u64,
    // kind -> (namespace, name) -> object; namespaces use an empty namespace.
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
}

#[derive(Clone)]
struct Event {
    kind: &'static str,
    namespace: String,
    kind_of_change: &'static str,
    object: Value,
}

struct State {
    token: String,
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    recorded: Mutex<Vec<Recorded>>,
    active_streams: watch::Sender<usize>,
    bytes_served: std::sync::atomic::AtomicU64,
}

/// A running test API server; dropping it stops it.
pub struct TestApiServer {
    pub addr: SocketAddr,
    pub token: String,
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

fn meta(name: &str, ns: Option<&str>, rv: u64, created: i64) -> Value {
    let mut m = json!({
        "name": name,
        "uid": format!("{:08x}-0000-4000-8000-{:012x}", rand::random::<u32>(), rand::random::<u64>() & 0xffff_ffff_ffff),
        "resourceVersion": rv.to_string(),
        "creationTimestamp": rfc3339(created),
    });
    if let Some(ns) = ns {
        m["namespace"] = json!(ns);
    }
    m
}

fn pod(name: &str, ns: &str, rv: u64) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": meta(name, Some(ns), rv, now_secs() - 300),
        "spec": {"containers": [{"name": "main", "image": "registry.example/app:1"}]},
        "status": {"phase": "Running", "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0}]},
    })
}

impl TestApiServer {
    /// Starts on `127.0.0.1:0` with a random token and a few namespaces and pods.
    pub async fn start() -> std::io::Result<Self> {
        let token = format!("test-sa-token-{:016x}", rand::random::<u64>());
        Self::start_on(TcpListener::bind("127.0.0.1:0").await?, token).await
    }

    /// Starts on a bound listener with the given token.
    pub async fn start_on(listener: TcpListener, token: String) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let mut objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>> =
            BTreeMap::new();
        let mut rv = 1;
        for ns in ["default", "kube-system", "shop"] {
            rv += 1;
            let o = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": meta(ns, None, rv, now_secs() - 86_400), "status": {"phase": "Active"}});
            objects
                .entry("namespaces")
                .or_default()
                .insert((String::new(), ns.into()), o);
        }
        for (ns, name) in [
            ("default", "web-0"),
            ("default", "web-1"),
            ("kube-system", "coredns-0"),
            ("shop", "cart-0"),
        ] {
            rv += 1;
            objects
                .entry("pods")
                .or_default()
                .insert((ns.into(), name.into()), pod(name, ns, rv));
        }
        objects.entry("configmaps").or_default();
        let (events, _) = broadcast::channel(1024);
        let state = Arc::new(State {
            token: token.clone(),
            store: Mutex::new(Store { rv, objects }),
            events,
            recorded: Mutex::new(Vec::new()),
            active_streams: watch::channel(0).0,
            bytes_served: Default::default(),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(s, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(TestApiServer {
            addr,
            token,
            state,
            task,
        })
    }

    /// Base URL (`http://127.0.0.1:port`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for the agent: this server and its token.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test-apiserver\n  cluster:\n    server: {}\ncontexts:\n- name: test\n  context:\n    cluster: test-apiserver\n    user: agentk\ncurrent-context: test\nusers:\n- name: agentk\n  user:\n    token: {}\n",
            self.url(),
            self.token
        )
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

    /// Creates a pod, notifying watchers.
    pub fn create_pod(&self, ns: &str, name: &str) {
        let mut st = self.state.store.lock().unwrap_or_else(|p| p.into_inner());
        st.rv += 1;
        let o = pod(name, ns, st.rv);
        st.objects
            .entry("pods")
            .or_default()
            .insert((ns.into(), name.into()), o.clone());
        drop(st);
        let _ = self.state.events.send(Event {
            kind: "pods",
            namespace: ns.into(),
            kind_of_change: "ADDED",
            object: o,
        });
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

fn record(state: &State, req: &Request<Incoming>, authenticated: bool) {
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
    let r = Recorded {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().unwrap_or_default().to_string(),
        authenticated_as: if authenticated {
            SERVICE_ACCOUNT.to_string()
        } else {
            String::new()
        },
        impersonate_user: all("impersonate-user").into_iter().next(),
        impersonate_uid: all("impersonate-uid").into_iter().next(),
        impersonate_groups: all("impersonate-group"),
        impersonate_extra: extra,
        websocket_protocols: all("sec-websocket-protocol")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect(),
        authorization: all("authorization").into_iter().next(),
    };
    state
        .recorded
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(r);
}

fn wants_table(h: &HeaderMap) -> bool {
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

fn age(o: &Value) -> String {
    let created = o["metadata"]["creationTimestamp"]
        .as_str()
        .unwrap_or_default();
    let _ = created;
    "5m".to_string()
}

fn table_row(kind: &str, o: &Value) -> Value {
    let name = o["metadata"]["name"].clone();
    let cells = match kind {
        "pods" => json!([
            name,
            "1/1",
            o["status"]["phase"].as_str().unwrap_or("Pending"),
            0,
            age(o)
        ]),
        "configmaps" => json!([
            name,
            o["data"].as_object().map(|m| m.len()).unwrap_or(0),
            age(o)
        ]),
        _ => json!([
            name,
            o["status"]["phase"].as_str().unwrap_or("Active"),
            age(o)
        ]),
    };
    json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}})
}

fn table(kind: &str, rv: u64, items: &[Value]) -> Value {
    let col = |n: &str, t: &str| json!({"name": n, "type": t, "format": if n == "Name" { "name" } else { "" }, "description": n, "priority": 0});
    let cols = match kind {
        "pods" => json!([
            col("Name", "string"),
            col("Ready", "string"),
            col("Status", "string"),
            col("Restarts", "integer"),
            col("Age", "string")
        ]),
        "configmaps" => json!([
            col("Name", "string"),
            col("Data", "integer"),
            col("Age", "string")
        ]),
        _ => json!([
            col("Name", "string"),
            col("Status", "string"),
            col("Age", "string")
        ]),
    };
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": cols,
        "rows": items.iter().map(|o| table_row(kind, o)).collect::<Vec<_>>(),
    })
}

fn kind_name(kind: &str) -> &'static str {
    match kind {
        "pods" => "Pod",
        "configmaps" => "ConfigMap",
        _ => "Namespace",
    }
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    req.into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| status(StatusCode::BAD_REQUEST, "BadRequest", "cannot read body"))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let authenticated = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", state.token));
    record(&state, &req, authenticated);
    if !authenticated {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let path = req.uri().path().trim_end_matches('/').to_string();
    let params = query_params(req.uri().query().unwrap_or_default());
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    // Any request may ask to be slow (a cluster under load), for caching tests.
    if let Some(ms) = param("_delay_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    match (method.clone(), segs.as_slice()) {
        (Method::GET, ["version"]) => json_resp(
            StatusCode::OK,
            &json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-kas-test-apiserver", "platform": "linux/amd64"}),
        ),
        (Method::GET, ["api"]) => json_resp(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]}),
        ),
        (Method::GET, ["apis"]) => {
            let g = |name: &str| json!({"name": name, "versions": [{"groupVersion": format!("{name}/v1"), "version": "v1"}], "preferredVersion": {"groupVersion": format!("{name}/v1"), "version": "v1"}});
            json_resp(
                StatusCode::OK,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [g("apps"), g("rbac.authorization.k8s.io"), g("policy")]}),
            )
        }
        (Method::GET, ["apis", "apps", "v1"]) => json_resp(
            StatusCode::OK,
            &json!({"kind": "APIResourceList", "groupVersion": "apps/v1", "resources": [
                {"name": "deployments", "singularName": "", "namespaced": true, "kind": "Deployment", "verbs": ["get", "list"], "shortNames": ["deploy"]}
            ]}),
        ),
        // Known to discovery only, for manifests checked with `kubectl apply --dry-run=client`.
        (Method::GET, ["apis", "policy", "v1"]) => json_resp(
            StatusCode::OK,
            &json!({"kind": "APIResourceList", "groupVersion": "policy/v1", "resources": [
                {"name": "poddisruptionbudgets", "singularName": "", "namespaced": true, "kind": "PodDisruptionBudget", "verbs": ["get", "list"], "shortNames": ["pdb"]}
            ]}),
        ),
        (Method::GET, ["apis", "rbac.authorization.k8s.io", "v1"]) => json_resp(
            StatusCode::OK,
            &json!({"kind": "APIResourceList", "groupVersion": "rbac.authorization.k8s.io/v1", "resources": [
                {"name": "clusterroles", "singularName": "", "namespaced": false, "kind": "ClusterRole", "verbs": ["get", "list"], "shortNames": []},
                {"name": "clusterrolebindings", "singularName": "", "namespaced": false, "kind": "ClusterRoleBinding", "verbs": ["get", "list"], "shortNames": []}
            ]}),
        ),
        // Read-only, fixed objects: enough for clients that span several API groups.
        (Method::GET, ["apis", "apps", "v1", "deployments"])
        | (Method::GET, ["apis", "apps", "v1", "namespaces", "default", "deployments"]) => {
            json_resp(
                StatusCode::OK,
                &json!({"kind": "DeploymentList", "apiVersion": "apps/v1", "metadata": {"resourceVersion": "1"}, "items": [
                    {"metadata": {"name": "web", "namespace": "default"}, "spec": {"replicas": 2}}
                ]}),
            )
        }
        (Method::GET, ["apis", "apps", "v1", "namespaces", _, "deployments"]) => json_resp(
            StatusCode::OK,
            &json!({"kind": "DeploymentList", "apiVersion": "apps/v1", "metadata": {"resourceVersion": "1"}, "items": []}),
        ),
        (Method::GET, ["apis", "rbac.authorization.k8s.io", "v1", "clusterroles"]) => json_resp(
            StatusCode::OK,
            &json!({"kind": "ClusterRoleList", "apiVersion": "rbac.authorization.k8s.io/v1", "metadata": {"resourceVersion": "1"}, "items": [
                {"metadata": {"name": "cluster-admin"}}, {"metadata": {"name": "view"}}
            ]}),
        ),
        (Method::GET, ["_test", "slow"]) => {
            let ms: u64 = param("ms").and_then(|v| v.parse().ok()).unwrap_or(2000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json_resp(StatusCode::OK, &json!({"kind": "Slow", "waitedMs": ms}))
        }
        (Method::GET, ["api", "v1"]) => {
            let r = |name: &str, kind: &str, namespaced: bool, verbs: Value, short: Value| json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": verbs, "shortNames": short});
            let crud = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
            json_resp(
                StatusCode::OK,
                &json!({
                    "kind": "APIResourceList", "groupVersion": "v1",
                    "resources": [
                        r("namespaces", "Namespace", false, crud.clone(), json!(["ns"])),
                        r("pods", "Pod", true, crud.clone(), json!(["po"])),
                        r("pods/exec", "PodExecOptions", true, json!(["create", "get"]), json!([])),
                        r("pods/log", "Pod", true, json!(["get"]), json!([])),
                        r("configmaps", "ConfigMap", true, crud, json!(["cm"])),
                        // Known to discovery only (so manifests can be checked with
                        // `kubectl apply --dry-run=client`); reading one answers 404.
                        r("secrets", "Secret", true, json!(["get", "list"]), json!([])),
                        r("services", "Service", true, json!(["get", "list"]), json!(["svc"])),
                        r("serviceaccounts", "ServiceAccount", true, json!(["get", "list"]), json!(["sa"])),
                        r("persistentvolumeclaims", "PersistentVolumeClaim", true, json!(["get", "list"]), json!(["pvc"])),
                    ]
                }),
            )
        }
        (Method::GET, ["openapi", "v3"]) => json_resp(
            StatusCode::OK,
            &json!({"paths": {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=kas-test"}}}),
        ),
        (Method::GET, ["openapi", "v3", "api", "v1"]) => {
            json_resp(StatusCode::OK, &openapi_v3_core())
        }
        (_, ["_test", "requests"]) => json_resp(
            StatusCode::OK,
            &serde_json::to_value(
                state
                    .recorded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            )
            .unwrap_or(Value::Null),
        ),
        (Method::GET, ["_test", "bytes"]) => {
            let n: u64 = param("n").and_then(|v| v.parse().ok()).unwrap_or(0);
            let chunk = Bytes::from(vec![b'k'; 64 * 1024]);
            let st = state.clone();
            let s = futures::stream::unfold(n, move |left| {
                let chunk = chunk.clone();
                let st = st.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let take = left.min(chunk.len() as u64) as usize;
                    st.bytes_served
                        .fetch_add(take as u64, std::sync::atomic::Ordering::SeqCst);
                    Some((
                        Ok::<_, std::io::Error>(Frame::data(chunk.slice(..take))),
                        left - take as u64,
                    ))
                }
            });
            let mut r = Response::new(StreamBody::new(s).boxed_unsync());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        (Method::GET, ["_test", "abort"]) => {
            // Some bytes, then the body fails: the connection breaks mid-response.
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from(vec![b'a'; 64 * 1024]))))
                    .await;
                // Fail a little later, once the head and first bytes are on the wire.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx
                    .send(Err(std::io::Error::other(
                        "upstream failed mid-body: secret detail",
                    )))
                    .await;
            });
            Response::new(
                StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync(),
            )
        }
        (Method::GET, ["_test", "stream"]) => {
            let guard = StreamGuard::new(&state);
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                let _guard = guard;
                let chunk = Bytes::from(vec![b's'; 16 * 1024]);
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                loop {
                    tokio::select! {
                        _ = tick.tick() => if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() { return },
                        _ = tx.closed() => return,
                    }
                }
            });
            Response::new(
                StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync(),
            )
        }
        (Method::POST, ["_test", "echo"]) => {
            let mut r = Response::new(
                req.into_body()
                    .map_err(std::io::Error::other)
                    .boxed_unsync(),
            );
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        (_, ["api", "v1", "namespaces", ns, "pods", name, "exec"]) => {
            exec(&state, req, ns, name, &params)
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "pods", name, "log"]) => {
            logs(&state, ns, name, param("follow").as_deref() == Some("true"))
        }
        (_, ["api", "v1", "namespaces"]) => {
            collection(&state, req, "namespaces", None, &params).await
        }
        (_, ["api", "v1", "namespaces", name]) => object(&state, req, "namespaces", "", name).await,
        (_, ["api", "v1", kind @ ("pods" | "configmaps")]) if method == Method::GET => {
            collection(&state, req, kind_static(kind), None, &params).await
        }
        (_, ["api", "v1", "namespaces", ns, kind @ ("pods" | "configmaps")]) => {
            collection(&state, req, kind_static(kind), Some(ns), &params).await
        }
        (_, ["api", "v1", "namespaces", ns, kind @ ("pods" | "configmaps"), name]) => {
            object(&state, req, kind_static(kind), ns, name).await
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

/// Just enough OpenAPI v3 for kubectl to see that the server validates fields itself
/// (`fieldValidation` on PATCH), so it sends `fieldValidation=Strict` instead of
/// downloading schemas for client-side validation.
fn openapi_v3_core() -> Value {
    let mut paths = serde_json::Map::new();
    for (kind, path) in [
        ("Namespace", "/api/v1/namespaces/{name}"),
        ("Pod", "/api/v1/namespaces/{namespace}/pods/{name}"),
        (
            "ConfigMap",
            "/api/v1/namespaces/{namespace}/configmaps/{name}",
        ),
    ] {
        let gvk = json!({"group": "", "version": "v1", "kind": kind});
        let params = json!([{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}, {"name": "dryRun", "in": "query", "schema": {"type": "string"}}]);
        paths.insert(path.to_string(), json!({
            "patch": {"operationId": format!("patch{kind}"), "parameters": params, "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}},
            "put": {"operationId": format!("replace{kind}"), "parameters": params, "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}},
        }));
    }
    json!({"openapi": "3.0.0", "info": {"title": "kas test API server", "version": "v1.32.0"}, "paths": paths, "components": {"schemas": {}}})
}

fn kind_static(k: &str) -> &'static str {
    match k {
        "pods" => "pods",
        "configmaps" => "configmaps",
        _ => "namespaces",
    }
}

async fn collection(
    state: &Arc<State>,
    req: Request<Incoming>,
    kind: &'static str,
    ns: Option<&str>,
    params: &[(String, String)],
) -> Response<Body> {
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let table_wanted = wants_table(req.headers());
    match *req.method() {
        Method::GET if matches!(param("watch").as_deref(), Some("true" | "1")) => {
            let since: u64 = param("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            watch(state, kind, ns.map(str::to_string), since, table_wanted)
        }
        Method::GET => {
            let st = state.store.lock().unwrap_or_else(|p| p.into_inner());
            let items: Vec<Value> = st
                .objects
                .get(kind)
                .map(|m| {
                    m.iter()
                        .filter(|((n, _), _)| ns.is_none_or(|x| x == n))
                        .map(|(_, v)| v.clone())
                        .collect()
                })
                .unwrap_or_default();
            let rv = st.rv;
            drop(st);
            if table_wanted {
                json_resp(StatusCode::OK, &table(kind, rv, &items))
            } else {
                json_resp(
                    StatusCode::OK,
                    &json!({"kind": format!("{}List", kind_name(kind)), "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
                )
            }
        }
        Method::POST => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the body is not a JSON object",
                );
            };
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value",
                );
            };
            let nskey = ns.unwrap_or("").to_string();
            let mut st = state.store.lock().unwrap_or_else(|p| p.into_inner());
            let map = st.objects.entry(kind).or_default();
            if map.contains_key(&(nskey.clone(), name.clone())) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", kind),
                );
            }
            st.rv += 1;
            let rv = st.rv;
            let mut m = meta(&name, ns, rv, now_secs());
            if let Some(extra) = obj["metadata"].as_object() {
                for (k, v) in extra {
                    if matches!(k.as_str(), "labels" | "annotations") {
                        m[k] = v.clone();
                    }
                }
            }
            obj["metadata"] = m;
            obj["apiVersion"] = json!("v1");
            obj["kind"] = json!(kind_name(kind));
            if kind == "pods" && obj["status"].is_null() {
                obj["status"] = json!({"phase": "Pending"});
            }
            st.objects
                .entry(kind)
                .or_default()
                .insert((nskey.clone(), name), obj.clone());
            drop(st);
            let _ = state.events.send(Event {
                kind,
                namespace: nskey,
                kind_of_change: "ADDED",
                object: obj.clone(),
            });
            json_resp(StatusCode::CREATED, &obj)
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        ),
    }
}

async fn object(
    state: &Arc<State>,
    req: Request<Incoming>,
    kind: &'static str,
    ns: &str,
    name: &str,
) -> Response<Body> {
    let key = (ns.to_string(), name.to_string());
    let not_found = || {
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{kind} \"{name}\" not found"),
        )
    };
    match req.method().clone() {
        Method::GET => {
            let table_wanted = wants_table(req.headers());
            let st = state.store.lock().unwrap_or_else(|p| p.into_inner());
            match st.objects.get(kind).and_then(|m| m.get(&key)) {
                Some(o) if table_wanted => {
                    json_resp(StatusCode::OK, &table(kind, st.rv, std::slice::from_ref(o)))
                }
                Some(o) => json_resp(StatusCode::OK, o),
                None => not_found(),
            }
        }
        Method::DELETE => {
            let mut st = state.store.lock().unwrap_or_else(|p| p.into_inner());
            st.rv += 1;
            let rv = st.rv;
            let removed = st
                .objects
                .get_mut(kind)
                .and_then(|m| m.remove(&key))
                .map(|mut o| {
                    // Deletion is a change with its own resource version.
                    o["metadata"]["resourceVersion"] = json!(rv.to_string());
                    o
                });
            drop(st);
            match removed {
                Some(o) => {
                    let _ = state.events.send(Event {
                        kind,
                        namespace: ns.into(),
                        kind_of_change: "DELETED",
                        object: o.clone(),
                    });
                    json_resp(StatusCode::OK, &o)
                }
                None => not_found(),
            }
        }
        m @ (Method::PUT | Method::PATCH) => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the body is not JSON",
                );
            };
            let mut st = state.store.lock().unwrap_or_else(|p| p.into_inner());
            st.rv += 1;
            let rv = st.rv;
            let Some(o) = st.objects.get_mut(kind).and_then(|map| map.get_mut(&key)) else {
                return not_found();
            };
            let keep_meta = o["metadata"].clone();
            if m == Method::PUT {
                *o = patch;
                o["metadata"] = keep_meta;
            } else {
                merge_patch(o, &patch);
            }
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            let o = o.clone();
            drop(st);
            let _ = state.events.send(Event {
                kind,
                namespace: ns.into(),
                kind_of_change: "MODIFIED",
                object: o.clone(),
            });
            json_resp(StatusCode::OK, &o)
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        ),
    }
}

fn watch(
    state: &Arc<State>,
    kind: &'static str,
    ns: Option<String>,
    since: u64,
    table_wanted: bool,
) -> Response<Body> {
    // Subscribe before reading the store, so no change falls between the two.
    let mut rx = state.events.subscribe();
    let rv_of = |o: &Value| {
        o["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut initial: Vec<Value> = {
        let st = state.store.lock().unwrap_or_else(|p| p.into_inner());
        st.objects
            .get(kind)
            .map(|m| {
                m.iter()
                    .filter(|((n, _), _)| ns.as_ref().is_none_or(|x| x == n))
                    .map(|(_, v)| v.clone())
                    .filter(|o| rv_of(o) > since)
                    .collect()
            })
            .unwrap_or_default()
    };
    initial.sort_by_key(rv_of);
    let mut sent_rv = initial.iter().map(rv_of).max().unwrap_or(since);
    let guard = StreamGuard::new(state);
    let (tx, out) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    let encode = move |t: &str, o: &Value| {
        let object = if table_wanted {
            table(kind, 0, std::slice::from_ref(o))
        } else {
            o.clone()
        };
        Bytes::from(format!("{}\n", json!({"type": t, "object": object})))
    };
    tokio::spawn(async move {
        let _guard = guard;
        for o in &initial {
            if tx.send(Ok(Frame::data(encode("ADDED", o)))).await.is_err() {
                return;
            }
        }
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(e) if e.kind == kind && ns.as_ref().is_none_or(|n| *n == e.namespace) => {
                        let rv: u64 = e.object["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
                        if rv > sent_rv {
                            sent_rv = rv;
                            if tx.send(Ok(Frame::data(encode(e.kind_of_change, &e.object)))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = tx.closed() => return,
            }
        }
    });
    let mut r = Response::new(
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(out)).boxed_unsync(),
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn logs(state: &Arc<State>, ns: &str, name: &str, follow: bool) -> Response<Body> {
    let exists = state
        .store
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .objects
        .get("pods")
        .is_some_and(|m| m.contains_key(&(ns.to_string(), name.to_string())));
    if !exists {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pods \"{name}\" not found"),
        );
    }
    if !follow {
        return full(
            StatusCode::OK,
            "text/plain",
            format!("{name}: line 1\n{name}: line 2\n"),
        );
    }
    let guard = StreamGuard::new(state);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let name = name.to_string();
    tokio::spawn(async move {
        let _guard = guard;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for i in 1.. {
            tokio::select! {
                _ = tick.tick() => if tx.send(Ok(Frame::data(Bytes::from(format!("{name}: line {i}\n"))))).await.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    let mut r = Response::new(
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync(),
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// `exec` over WebSocket: `echo ARGS` prints its arguments; any other command echoes
/// stdin to stdout until stdin closes.
fn exec(
    state: &Arc<State>,
    mut req: Request<Incoming>,
    _ns: &str,
    _name: &str,
    params: &[(String, String)],
) -> Response<Body> {
    let h = req.headers();
    let is_ws = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = h
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "exec needs a WebSocket upgrade (this test server does not speak SPDY)",
        );
    };
    if !is_ws {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "exec needs a WebSocket upgrade",
        );
    }
    let offered: Vec<String> = h
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .collect();
    let Some(proto) = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        .into_iter()
        .find(|p| offered.iter().any(|o| o == p))
    else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "no supported exec subprotocol offered",
        );
    };
    let command: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let guard = StreamGuard::new(state);
    let v5 = proto.starts_with("v5");
    tokio::spawn(async move {
        let _guard = guard;
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        let out = |ch: u8, data: &[u8]| {
            let mut v = Vec::with_capacity(data.len() + 1);
            v.push(ch);
            v.extend_from_slice(data);
            Message::binary(v)
        };
        if command.first().map(String::as_str) == Some("echo") {
            let _ = ws
                .send(out(1, format!("{}\n", command[1..].join(" ")).as_bytes()))
                .await;
        } else {
            while let Some(Ok(msg)) = ws.next().await {
                let reply = match msg {
                    Message::Binary(b) if b.first() == Some(&0) => out(1, &b[1..]),
                    // v5: stdin closed.
                    Message::Binary(b) if v5 && b.first() == Some(&255) => break,
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    return;
                }
            }
        }
        let _ = ws
            .send(out(3, br#"{"metadata":{},"status":"Success"}"#))
            .await;
        let _ = ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    });
    let mut r = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hm = r.headers_mut();
    hm.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    hm.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    if let Ok(v) = accept.parse() {
        hm.insert("sec-websocket-accept", v);
    }
    hm.insert(
        "sec-websocket-protocol",
        header::HeaderValue::from_static(proto),
    );
    r
}
