//! kas's own work in agents' clusters: managed applications installed by one-off pods
//! ([`apps`]) and namespaces made for CI jobs' environments ([`namespaces`]).
//!
//! kas reaches a cluster the way the central application does: through the client
//! library (`kas-client`) and the application API, here in process (no socket, no
//! shared secret on disk: the API is served by a router signed with a secret that
//! never leaves this kas). So the library's rules hold: no redirects, errors as codes
//! only, a timeout on every call, and every call in the Kubernetes integration log.
//! It runs only in background tasks or in the admin API's job start, never in a
//! handler of the Kubernetes API proxy.

pub mod apps;
pub mod eks;
mod leased;
pub mod namespaces;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use kas_client::{BoxError, KasClient, ResponseBody, Transport};
use serde_json::Value;
use std::time::Duration;
use tower::ServiceExt;

/// How long one cluster call may take up to its response head.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The application API's router, called in process.
struct InProcess(axum::Router);

impl Transport for InProcess {
    fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> futures::future::BoxFuture<'static, Result<Response<ResponseBody>, BoxError>> {
        let router = self.0.clone();
        let mut req = req;
        // What an HTTP client would add: the body's length.
        if let Some(n) = http_body::Body::size_hint(req.body()).exact() {
            req.headers_mut()
                .insert(http::header::CONTENT_LENGTH, n.into());
        }
        Box::pin(async move {
            let resp = match router.oneshot(req.map(axum::body::Body::new)).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
        })
    }
}

/// A failed cluster call, as a code fit for records and callers (never the cluster's
/// words: it may be anyone's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}")]
pub struct CallError {
    pub code: String,
}

impl From<kas_client::Error> for CallError {
    fn from(e: kas_client::Error) -> Self {
        let code = match e.status {
            Some(s) => format!("cluster_status_{s}"),
            None => format!("cluster_{:?}", e.kind).to_ascii_lowercase(),
        };
        CallError { code }
    }
}

impl CallError {
    fn decode() -> Self {
        CallError {
            code: "cluster_decode".into(),
        }
    }
}

/// The cluster of one agent, as kas itself calls it.
#[derive(Clone)]
pub struct Clusters {
    client: KasClient,
}

impl Clusters {
    /// Calls go to `app_router` (the application API's routes, checking tokens signed
    /// with `secret`).
    pub fn new(app_router: axum::Router, secret: &[u8]) -> Self {
        let transport = std::sync::Arc::new(InProcess(app_router));
        Clusters {
            client: KasClient::with_transport(transport, secret, CALL_TIMEOUT),
        }
    }

    /// Calls go over `transport` (kas's own calls straight to a cluster).
    pub fn over(transport: std::sync::Arc<dyn Transport>) -> Self {
        Clusters {
            client: KasClient::with_transport(
                transport,
                b"unused: the transport authenticates",
                CALL_TIMEOUT,
            ),
        }
    }

    /// `GET <path>` as JSON (`path` under `/api/v1` or `/apis/...`); `None` when the
    /// object does not exist.
    pub async fn get(&self, agent: u64, path: &str) -> Result<Option<Value>, CallError> {
        match self.call(agent, Method::GET, path, None).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.code == "cluster_status_404" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates `object` in the collection at `path`; an object of that name already
    /// there counts as created (callers make objects idempotently).
    pub async fn ensure(&self, agent: u64, path: &str, object: &Value) -> Result<(), CallError> {
        match self.call(agent, Method::POST, path, Some(object)).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == "cluster_status_409" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates `object` at `path` (a collection), failing if it exists.
    pub async fn create(&self, agent: u64, path: &str, object: &Value) -> Result<(), CallError> {
        self.call(agent, Method::POST, path, Some(object))
            .await
            .map(|_| ())
    }

    /// Replaces the object at `path` (its name) with `object`.
    pub async fn replace(&self, agent: u64, path: &str, object: &Value) -> Result<(), CallError> {
        self.call(agent, Method::PUT, path, Some(object))
            .await
            .map(|_| ())
    }

    /// Deletes the object at `path`; one already gone counts as deleted.
    pub async fn delete(&self, agent: u64, path: &str) -> Result<(), CallError> {
        match self.call(agent, Method::DELETE, path, None).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == "cluster_status_404" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The text at `path` (a pod's log), whole.
    pub async fn text(&self, agent: u64, path: &str) -> Result<String, CallError> {
        let body = self
            .send(agent, Method::GET, path, Bytes::new())
            .await?
            .bytes(CALL_TIMEOUT)
            .await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    async fn send(
        &self,
        agent: u64,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<kas_client::Streamed, CallError> {
        let (group, rest) = split_api_path(path).ok_or_else(|| CallError {
            code: "invalid_path".into(),
        })?;
        Ok(group(&self.client.agent(agent))
            .send(method, rest, body)
            .await?)
    }

    async fn call(
        &self,
        agent: u64,
        method: Method,
        path: &str,
        object: Option<&Value>,
    ) -> Result<Value, CallError> {
        let body = match object {
            Some(o) => Bytes::from(serde_json::to_vec(o).map_err(|_| CallError::decode())?),
            None => Bytes::new(),
        };
        let bytes = self
            .send(agent, method, path, body)
            .await?
            .bytes(CALL_TIMEOUT)
            .await?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|_| CallError::decode())
    }
}

type GroupOf = fn(&kas_client::AgentClient) -> kas_client::ApiGroup;

/// `/api/v1/<rest>` or `/apis/rbac.authorization.k8s.io/v1/<rest>`: the client's API
/// group and the rest of the path.
fn split_api_path(path: &str) -> Option<(GroupOf, &str)> {
    if let Some(rest) = path.strip_prefix("/api/v1/") {
        return Some((kas_client::AgentClient::core, rest));
    }
    if let Some(rest) = path.strip_prefix("/apis/apps/v1/") {
        return Some((kas_client::AgentClient::apps_v1, rest));
    }
    if let Some(rest) = path.strip_prefix("/apis/rbac.authorization.k8s.io/v1/") {
        return Some((kas_client::AgentClient::rbac_v1, rest));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::application::{validation, AppState, IntegrationLog};
    use kas_controlplane::SqliteControlPlane;
    use std::sync::Arc;

    async fn clusters() -> (Clusters, Arc<dyn kas_controlplane::ControlPlane>) {
        let (c, cp, _) = world().await;
        (c, cp)
    }

    async fn world() -> (
        Clusters,
        Arc<dyn kas_controlplane::ControlPlane>,
        Arc<kas_tunnel::TunnelRegistry>,
    ) {
        let cp: Arc<dyn kas_controlplane::ControlPlane> =
            Arc::new(SqliteControlPlane::in_memory().expect("db"));
        let registry = kas_tunnel::TunnelRegistry::new();
        let secret = [7u8; 32];
        let state = Arc::new(AppState {
            cp: cp.clone(),
            router: kas_router::AgentRouter::local(registry.clone()),
            decoding: jsonwebtoken::DecodingKey::from_secret(&secret),
            validation: validation(),
            agent_wait: Duration::from_millis(50),
            log: IntegrationLog::new(None).0,
        });
        let router = crate::http::application::router(state);
        (Clusters::new(router, &secret), cp, registry)
    }

    #[tokio::test]
    async fn a_json_body_reaches_the_agent_with_its_type_and_end() {
        use futures::StreamExt;
        let (c, cp, registry) = world().await;
        cp.create_project("acme/agents", None).await.expect("p");
        let (agent, _) = cp.create_agent("acme/agents", "prod").await.expect("a");
        let guard = registry.add_replica(
            agent.id,
            kas_tunnel::ReplicaInfo {
                replica_id: "r1".into(),
                agent_version: "test".into(),
                peer: "memory".into(),
                meta: Default::default(),
            },
        );
        let (inbound, out, mut end) = kas_tunnel::testing::tunnel();
        registry.offer(agent.id, guard.connection_key(), inbound, out);
        let ns = serde_json::json!({"kind": "Namespace"});
        let call = c.ensure(agent.id, "/api/v1/namespaces", &ns);
        let served = async {
            let head = end.request().await;
            let mut frames = Vec::new();
            while let Some(Ok(f)) = end.from_kas.next().await {
                frames.push(format!("{:?}", f.msg));
                if frames.len() == 2 {
                    break;
                }
            }
            end.respond(201, "{}");
            (head, frames)
        };
        let (result, (head, frames)) = tokio::join!(call, served);
        assert_eq!(result, Ok(()));
        assert_eq!(head.method, "POST");
        let typed = head.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case(b"content-type") && h.value.as_ref() == b"application/json"
        });
        assert!(typed, "{:?}", head.headers);
        assert!(frames[0].contains("Namespace"), "{frames:?}");
        assert!(frames[1].contains("EndOfBody"), "{frames:?}");
    }

    #[tokio::test]
    async fn calls_go_through_the_application_api_and_fail_with_codes_only() {
        let (c, cp) = clusters().await;
        let e = c.delete(9, "/api/v1/namespaces/x").await;
        assert_eq!(
            e,
            Ok(()),
            "an unknown agent answers 404, as a missing object does"
        );
        cp.create_project("acme/agents", None).await.expect("p");
        let (agent, _) = cp.create_agent("acme/agents", "prod").await.expect("a");
        let e = c
            .ensure(agent.id, "/api/v1/namespaces", &serde_json::json!({}))
            .await
            .expect_err("not connected");
        assert_eq!(e.code, "cluster_status_503");
        let e = c.get(agent.id, "/apis/batch/v1/x").await.expect_err("path");
        assert_eq!(e.code, "invalid_path");
    }
}
