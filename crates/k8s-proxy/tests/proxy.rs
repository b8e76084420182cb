//! The proxy in memory, with tokio's clock paused: a real control plane on in-memory
//! SQLite, the registry of a single kas, and an agent made of channels that answers the
//! tunnels it offered. No sockets: what the proxy sends the agent, and what it answers
//! the client, are checked exactly.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use kas_controlplane::{ControlPlane, SqliteControlPlane, StartJob};
use kas_k8s_proxy::{K8sProxy, ProxyOptions};
use kas_router::AgentRouter;
use kas_tunnel::testing::{self, FakeAgentEnd};
use kas_tunnel::{ReplicaGuard, ReplicaInfo, TunnelRegistry};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;

const CONFIG: &str =
    "ci_access:\n  groups:\n    - id: acme\n      access_as:\n        ci_job: {}\n";

struct World {
    proxy: Arc<K8sProxy>,
    registry: Arc<TunnelRegistry>,
    agent_id: u64,
    job_id: u64,
    /// `Bearer ci:<agent>:<job token>`.
    authorization: String,
}

async fn world() -> World {
    let cp = SqliteControlPlane::in_memory().expect("in-memory control plane");
    cp.create_group("acme", None).await.expect("group");
    cp.create_project("acme/agents", None)
        .await
        .expect("project");
    cp.create_project("acme/app", None).await.expect("project");
    let (agent, _token) = cp.create_agent("acme/agents", "prod").await.expect("agent");
    cp.set_agent_config("acme/agents", "prod", CONFIG, &Default::default())
        .await
        .expect("config");
    let (job, token) = cp
        .start_job(&StartJob {
            project: "acme/app".into(),
            environment: None,
            username: "alice".into(),
            pipeline_id: None,
            protected_ref: false,
        })
        .await
        .expect("job");
    let registry = TunnelRegistry::new();
    let opts = ProxyOptions {
        agent_wait: Duration::from_secs(5),
        ..Default::default()
    };
    let proxy = K8sProxy::new(Arc::new(cp), AgentRouter::local(registry.clone()), opts);
    World {
        proxy,
        registry,
        agent_id: agent.id,
        job_id: job.id,
        authorization: format!("Bearer ci:{}:{}", agent.id, token.expose()),
    }
}

fn connect(w: &World) -> (ReplicaGuard, FakeAgentEnd) {
    let guard = w.registry.add_replica(
        w.agent_id,
        ReplicaInfo {
            replica_id: "r1".into(),
            agent_version: "test".into(),
            peer: "memory".into(),
            meta: Default::default(),
        },
    );
    let (inbound, out, agent) = testing::tunnel();
    w.registry
        .offer(w.agent_id, guard.connection_key(), inbound, out);
    (guard, agent)
}

fn request(path: &str, authorization: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::get(path).header("impersonate-user", "system:admin");
    if let Some(a) = authorization {
        b = b.header("authorization", a);
    }
    b.body(Full::new(Bytes::new())).expect("request")
}

async fn answer(
    proxy: &Arc<K8sProxy>,
    req: Request<Full<Bytes>>,
) -> (StatusCode, serde_json::Value) {
    let resp = proxy.clone().handle(req).await;
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

#[tokio::test(start_paused = true)]
async fn a_job_reaches_its_agent_as_itself_and_never_as_what_it_claims() {
    let w = world().await;
    let (_guard, mut agent) = connect(&w);
    let req = request(
        "/k8s-proxy/api/v1/namespaces/default/pods",
        Some(&w.authorization),
    );
    let client = answer(&w.proxy, req);
    let served = async {
        let head = agent.request().await;
        agent.respond(200, r#"{"kind":"PodList","items":[]}"#);
        head
    };
    let ((status, body), head) = tokio::join!(client, served);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["kind"], "PodList");
    assert_eq!(head.path_and_query, "/api/v1/namespaces/default/pods");
    let imp = head.impersonation.expect("the job is impersonated");
    assert_eq!(imp.username, format!("gitlab:ci_job:{}", w.job_id));
    assert!(
        imp.groups.iter().any(|g| g == "gitlab:ci_job"),
        "{:?}",
        imp.groups
    );
    // Neither the job's credentials nor its forged identity reach the cluster.
    for h in &head.headers {
        let name = String::from_utf8_lossy(&h.name).to_ascii_lowercase();
        assert!(
            name != "authorization" && !name.starts_with("impersonate-"),
            "{name} was forwarded"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn requests_without_valid_credentials_get_a_status_and_reach_no_agent() {
    let w = world().await;
    let (_guard, mut agent) = connect(&w);
    let wrong_job = format!("Bearer ci:{}:not-the-token", w.agent_id);
    let other_agent = w.authorization.replace(
        &format!("ci:{}:", w.agent_id),
        &format!("ci:{}:", w.agent_id + 100),
    );
    let cases = [
        (None, StatusCode::UNAUTHORIZED),
        (Some("Basic YWxpY2U6cHc="), StatusCode::UNAUTHORIZED),
        (Some(wrong_job.as_str()), StatusCode::UNAUTHORIZED),
        (Some(other_agent.as_str()), StatusCode::FORBIDDEN),
    ];
    for (authorization, want) in cases {
        let (status, body) = answer(&w.proxy, request("/api/v1/pods", authorization)).await;
        assert_eq!(status, want, "{authorization:?}: {body}");
        assert_eq!(body["kind"], "Status", "{body}");
        assert_eq!(body["code"], want.as_u16(), "{body}");
    }
    // The agent saw none of them: its tunnel is still idle.
    assert!(
        tokio::time::timeout(Duration::from_millis(1), agent.from_kas.next())
            .await
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn a_disconnected_agent_answers_after_the_wait_with_a_status() {
    let w = world().await;
    let started = tokio::time::Instant::now();
    let (status, body) = answer(&w.proxy, request("/api/v1/pods", Some(&w.authorization))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["kind"], "Status");
    assert!(started.elapsed() >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_request_waiting_for_the_agent_is_served_when_it_connects() {
    let w = world().await;
    let req = request("/version", Some(&w.authorization));
    let client = answer(&w.proxy, req);
    let agent = async {
        // The agent connects two seconds after the request arrived.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (guard, mut agent) = connect(&w);
        assert_eq!(agent.request().await.path_and_query, "/version");
        agent.respond(200, r#"{"major":"1"}"#);
        guard
    };
    let ((status, body), _guard) = tokio::join!(client, agent);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["major"], "1");
}
