//! The application side: kas's application API (JWT), an in-cluster service reached
//! through the agent with its allow-list, and the client library with its reactive
//! cache, all against the real kas and agentk binaries.

use futures::StreamExt;
use kas_client::{CacheOptions, Cached, ClientOptions, ErrorKind, KasClient, ReactiveCache};
use kas_test_support::fixture::{wait_for, Env};
use kas_test_support::prometheus;
use serde_json::Value;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SECRET: &str = "application-secret-of-at-least-32-bytes!";

struct App {
    env: Env,
    _dir: tempfile::TempDir,
    agent: u64,
    prom: std::net::SocketAddr,
    log_file: std::path::PathBuf,
}

async fn setup() -> App {
    let prom = prometheus::start().await.expect("prometheus");
    let dir = tempfile::tempdir().expect("tmp");
    let secret = dir.path().join("app-secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let log_file = dir.path().join("k8s-integration.jsonl");
    let cfg = dir.path().join("kas.yaml");
    std::fs::write(
        &cfg,
        format!(
            "application:\n  secret_file: {}\n  integration_log_file: {}\n",
            secret.display(),
            log_file.display()
        ),
    )
    .expect("config");
    let mut env = Env::start_with(&["--config", cfg.to_str().expect("path")]).await;
    let (agent, token) = env.create_agent(
        "acme/platform/agents",
        "prod",
        &format!(
            "service_access:\n  - url: http://127.0.0.1:{}/api/v1/\n",
            prom.port()
        ),
    );
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 1);
    App {
        env,
        _dir: dir,
        agent,
        prom,
        log_file,
    }
}

fn client(env: &Env) -> KasClient {
    KasClient::new(
        ClientOptions {
            url: env.kas_info.api.clone(),
            ca_pem: None,
            timeout: Duration::from_secs(10),
        },
        SECRET.as_bytes(),
    )
    .expect("client")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prometheus_query_and_a_slow_stream_through_the_agent() {
    let app = setup().await;
    let kas = client(&app.env);
    let prom = kas
        .agent(app.agent)
        .service("http", "127.0.0.1", app.prom.port());
    let body = prom
        .get("api/v1/query?query=up")
        .await
        .unwrap_or_else(|e| panic!("query: {e:?}\n{}", app.env.logs()))
        .bytes(Duration::from_secs(10))
        .await
        .expect("body");
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["status"], "success");
    assert_eq!(v["data"]["result"][0]["metric"]["__name__"], "up");

    // A slow stream arrives chunk by chunk, not all at the end.
    let mut chunks = prom
        .get("api/v1/stream?n=4&ms=300")
        .await
        .expect("stream")
        .chunks();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(c) = chunks.next().await {
        text.push_str(&String::from_utf8_lossy(&c.expect("chunk")));
        arrivals.push(Instant::now());
    }
    assert_eq!(text.lines().count(), 4, "{text}");
    let spread = *arrivals.last().expect("last") - arrivals[0];
    assert!(
        spread >= Duration::from_millis(600),
        "all chunks arrived together: {spread:?}"
    );

    // The agents list says it is connected.
    let agents = kas.agents().await.expect("agents");
    let me = agents.iter().find(|a| a.id == app.agent).expect("listed");
    assert!(me.connected && me.replicas == 1, "{me:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_redirects_and_revealing_errors() {
    let app = setup().await;
    let kas = client(&app.env);
    let agent = kas.agent(app.agent);
    let prom = agent.service("http", "127.0.0.1", app.prom.port());
    // Outside the allowed path prefix, and another port: the agent refuses.
    let e = prom.get("admin/config").await.err().expect("refused");
    assert_eq!((e.kind, e.status), (ErrorKind::Forbidden, Some(403)));
    let other = agent.service("http", "127.0.0.1", 1);
    let e = other.get("api/v1/query").await.err().expect("refused");
    assert_eq!(e.kind, ErrorKind::Forbidden);
    // A redirect is reported, never followed.
    let e = prom.get("api/v1/redirect").await.err().expect("redirect");
    assert_eq!((e.kind, e.status), (ErrorKind::Redirect, Some(302)));
    // An upstream failing with a revealing body: only the code reaches the caller.
    let e = prom.get("api/v1/fail").await.err().expect("fails");
    assert_eq!(e.status, Some(500));
    assert_eq!(e.to_string(), "Kubernetes error: 500");
    assert!(!format!("{e:?}").contains("hunter2"));

    // The integration log has a record per call, and no secrets.
    let log = wait_for(Duration::from_secs(5), "integration log", || {
        let s = std::fs::read_to_string(&app.log_file).ok()?;
        (s.lines().count() >= 4).then_some(s)
    });
    let records: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let refused = records
        .iter()
        .find(|r| r["path"] == "/admin/config")
        .expect("refused call logged");
    assert_eq!(refused["status"], 403);
    assert_eq!(refused["error_code"], "refused_by_agent");
    assert_eq!(refused["agent_id"], app.agent);
    assert!(refused["duration_ms"].as_f64().is_some());
    assert!(records.iter().any(|r| r["status"] == 500));
    assert!(!log.contains(SECRET) && !log.contains("hunter2") && !log.contains("Bearer"));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_client_three_api_groups_and_a_reactive_cache() {
    let app = setup().await;
    app.env.api.create_pod("default", "web-0");
    let kas = client(&app.env);
    let agent = kas.agent(app.agent);
    let pods = agent
        .core()
        .list("pods", Some("default"))
        .await
        .expect("pods");
    let names: Vec<&str> = pods["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert!(names.contains(&"web-0"), "{names:?}");
    let deploys = agent
        .apps_v1()
        .list("deployments", Some("default"))
        .await
        .expect("deployments");
    assert_eq!(deploys["kind"], "DeploymentList");
    let roles = agent
        .rbac_v1()
        .list("clusterroles", None)
        .await
        .expect("roles");
    assert!(
        roles["items"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["metadata"]["name"] == "cluster-admin")),
        "{roles}"
    );
    // As a user the application names.
    agent
        .clone()
        .impersonate("alice", &["developers"])
        .core()
        .list("configmaps", Some("as-alice"))
        .await
        .expect("impersonated");
    let rec = app
        .env
        .api
        .recorded_for("/api/v1/namespaces/as-alice/configmaps");
    assert_eq!(rec[0].impersonate_user.as_deref(), Some("alice"));
    assert_eq!(rec[0].impersonate_groups, ["developers"]);
    // Without impersonation the cluster sees the agent itself.
    let rec = app.env.api.recorded_for("/api/v1/namespaces/default/pods");
    assert_eq!(rec[0].impersonate_user, None);
    // A missing object is a 404 error without the cluster's message.
    let e = agent
        .core()
        .get_json("namespaces/default/pods/nope")
        .await
        .expect_err("404");
    assert_eq!((e.kind, e.status), (ErrorKind::NotFound, Some(404)));

    // The cluster takes 2 s to answer; the cache answers at once, then has the value.
    let cluster = agent.clone();
    let cache = ReactiveCache::new(CacheOptions::default(), move |ns: String| {
        let cluster = cluster.clone();
        Box::pin(async move {
            let list = cluster
                .core()
                .get_json(&format!("namespaces/{ns}/pods?_delay_ms=2000"))
                .await?;
            Ok(list["items"].as_array().map(Vec::len).unwrap_or(0))
        })
    });
    let t = Instant::now();
    assert_eq!(cache.get(&"default".to_string()), Cached::NotReady);
    assert!(t.elapsed() < Duration::from_millis(500), "the cache waited");
    let n = wait_for(Duration::from_secs(15), "the cached value", || match cache
        .get(&"default".to_string())
    {
        Cached::Ready { value, .. } => Some(*value),
        _ => None,
    });
    assert_eq!(n, names.len());
    assert!(t.elapsed() >= Duration::from_secs(2));
}

async fn raw_status(env: &Env, token: Option<&str>) -> u16 {
    let url = format!("{}/application/v1/agents", env.kas_info.api);
    let c = kas_test_support::http::client(&[], false);
    kas_test_support::http::get(&c, &url, token).await.0
}

#[tokio::test(flavor = "multi_thread")]
async fn application_tokens_are_checked() {
    let app = setup().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time")
        .as_secs();
    let sign = |secret: &str, aud: &str, exp: u64| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"aud": aud, "exp": exp, "iss": "test"}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    };
    assert_eq!(
        raw_status(&app.env, Some(&sign(SECRET, "kas-application", now + 60))).await,
        200
    );
    assert_eq!(raw_status(&app.env, None).await, 401);
    assert_eq!(
        raw_status(
            &app.env,
            Some(&sign(
                "another-secret-of-at-least-32-bytes!!",
                "kas-application",
                now + 60
            ))
        )
        .await,
        401
    );
    assert_eq!(
        raw_status(&app.env, Some(&sign(SECRET, "kas-application", now - 600))).await,
        401
    );
    assert_eq!(
        raw_status(&app.env, Some(&sign(SECRET, "someone-else", now + 60))).await,
        401
    );
    assert_eq!(raw_status(&app.env, Some("not-a-jwt")).await, 401);
}
