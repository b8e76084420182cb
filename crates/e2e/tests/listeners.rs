//! No client can stop kas or hold its resources: silent and idle connections are
//! closed, each listener caps its connections, running out of file descriptors is
//! survived on every listener, agent connections age out and are dropped when their
//! peer freezes, and agents must send their first messages in time.

use kas_test_support::fixture::{wait_for, Env};
use kas_test_support::http::{sample, scrape};
use kas_test_support::sockets::{closed_within, connect, tls_connect};
use std::time::{Duration, Instant};

const CONFIG: &str = "ci_access:\n  projects:\n    - id: acme/web/shop\n";

/// kas with `yaml` as its configuration file and one connected agent.
async fn env_with(yaml: &str, wrapper: &[&str]) -> (Env, u64, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("kas.yaml");
    std::fs::write(&cfg, yaml).expect("config");
    let mut env = Env::start_wrapped(wrapper, &["--config", cfg.to_str().expect("path")]).await;
    env.kasctl(&["project", "create", "acme/web/shop"]);
    let (agent, token) = env.create_agent("acme/platform/agents", "prod", CONFIG);
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 1);
    (env, agent, token)
}

/// A request through the proxy as a job of acme/web/shop; its status code.
async fn proxy_get(env: &Env, agent: u64, job_token: &str) -> u16 {
    let c = kas_test_support::http::client(&env.proxy_ca(), false);
    let url = format!("{}/api/v1/namespaces/default/pods", env.proxy_url());
    let res = tokio::time::timeout(
        Duration::from_secs(20),
        kas_test_support::http::get(&c, &url, Some(&format!("ci:{agent}:{job_token}"))),
    )
    .await;
    res.map(|(code, _)| code).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_and_idle_connections_are_closed() {
    let (env, agent, _) = env_with(
        "connections:\n  agent: {first_request_timeout: 500ms, idle_timeout: 1s}\n  k8s_proxy: {first_request_timeout: 500ms, handshake_timeout: 500ms, idle_timeout: 1s}\n  api: {first_request_timeout: 500ms, idle_timeout: 1s}\n",
        &[],
    )
    .await;
    let ca = env.proxy_ca();
    let info = env.kas_info.clone();
    let since = env.connected(agent).expect("connected")["replicas"][0]["connected_since"].clone();
    let started = Instant::now();
    let mut agent_tcp = connect(&info.agent).await.expect("agent");
    let mut api_tcp = connect(&info.api).await.expect("api");
    let mut proxy_tcp = connect(&info.k8s_proxy).await.expect("proxy");
    let mut proxy_tls = tls_connect(&ca, &info.k8s_proxy).await.expect("tls");
    let wait = Duration::from_secs(5);
    assert!(
        closed_within(&mut agent_tcp, wait).await,
        "agent listener kept a silent connection"
    );
    assert!(
        closed_within(&mut api_tcp, wait).await,
        "api listener kept a silent connection"
    );
    assert!(
        closed_within(&mut proxy_tcp, wait).await,
        "proxy kept a connection without a TLS handshake"
    );
    assert!(
        closed_within(&mut proxy_tls, wait).await,
        "proxy kept a TLS connection without a request"
    );
    assert!(started.elapsed() < Duration::from_secs(4));

    // A keep-alive connection is closed once idle, not while a request runs.
    let mut api = connect(&info.api).await.expect("api");
    tokio::io::AsyncWriteExt::write_all(
        &mut api,
        b"GET /api/v1/groups HTTP/1.1\r\nHost: kas\r\n\r\n",
    )
    .await
    .expect("write");
    assert!(
        closed_within(&mut api, Duration::from_secs(5)).await,
        "idle keep-alive kept"
    );

    let m = scrape(&info.observability).await;
    for (listener, reason) in [
        ("agent", "first_request_timeout"),
        ("api", "first_request_timeout"),
        ("api", "idle_timeout"),
        ("k8s_proxy", "handshake_timeout"),
        ("k8s_proxy", "first_request_timeout"),
    ] {
        let key = format!(
            "kas_listener_connections_closed_total{{listener=\"{listener}\",reason=\"{reason}\"}}"
        );
        assert!(sample(&m, &key) >= 1.0, "{key} not counted:\n{m}");
    }
    // The agent's own connection carries its configuration stream: never idle.
    let now = env.connected(agent).expect("still connected");
    assert_eq!(now["replicas"][0]["connected_since"], since);
    let job = env.start_job("acme/web/shop", None, "alice");
    assert_eq!(proxy_get(&env, agent, &job.token).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_listener_caps_its_connections() {
    let (env, _, _) = env_with(
        "connections:\n  api: {max: 2, first_request_timeout: 60s}\n",
        &[],
    )
    .await;
    let info = env.kas_info.clone();
    let held = [
        connect(&info.api).await.expect("1"),
        connect(&info.api).await.expect("2"),
    ];
    // The third is closed on arrival.
    let mut third = connect(&info.api).await.expect("3");
    assert!(closed_within(&mut third, Duration::from_secs(5)).await);
    let out = kas_test_support::procs::kasctl_raw(&info, &["agents"]);
    assert!(!out.status.success(), "kasctl got through a full listener");
    let m = scrape(&info.observability).await;
    assert!(
        sample(
            &m,
            "kas_listener_connections_refused_total{listener=\"api\"}"
        ) >= 2.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "kas_listener_connections{listener=\"api\"}"),
        2.0,
        "{m}"
    );
    drop(held);
    wait_for(Duration::from_secs(5), "kasctl to work again", || {
        kas_test_support::procs::kasctl_raw(&info, &["agents"])
            .status
            .success()
            .then_some(())
    });
}

/// Holds `n` connections to `url` (TLS ones when `ca` is given).
async fn flood(url: &str, ca: Option<&[u8]>, n: usize) -> Vec<Box<dyn std::any::Any + Send>> {
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    for _ in 0..n {
        let c: Box<dyn std::any::Any + Send> = match ca {
            // A handshake kas cannot complete (it has no descriptor to accept with) is
            // not waited for: the connection still sits in the backlog.
            Some(ca) => {
                match tokio::time::timeout(Duration::from_millis(300), tls_connect(ca, url)).await {
                    Ok(Ok(s)) => Box::new(s),
                    _ => continue,
                }
            }
            None => match connect(url).await {
                Ok(s) => Box::new(s),
                Err(_) => continue,
            },
        };
        held.push(c);
    }
    held
}

fn alive(env: &mut Env) -> bool {
    matches!(env.kas.child.try_wait(), Ok(None))
}

/// With a low open-file limit, connections held on any listener exhaust kas's file
/// descriptors. kas keeps running, and recovers when they go away: agents reconnect
/// and kubectl works again.
#[tokio::test(flavor = "multi_thread")]
async fn exhausted_file_descriptors_do_not_stop_kas() {
    let (mut env, agent, token) = env_with(
        "connections:\n  agent: {first_request_timeout: 120s}\n  k8s_proxy: {first_request_timeout: 120s}\n  api: {first_request_timeout: 120s}\n",
        &["prlimit", "--nofile=160:160", "--"],
    )
    .await;
    let job = env.start_job("acme/web/shop", None, "alice");
    assert_eq!(proxy_get(&env, agent, &job.token).await, 200);
    let info = env.kas_info.clone();
    let ca = env.proxy_ca();
    for (side, url, tls) in [
        ("agent", info.agent.clone(), false),
        ("k8s_proxy", info.k8s_proxy.clone(), true),
        ("api", info.api.clone(), false),
    ] {
        let held = flood(&url, tls.then_some(&ca[..]), 200).await;
        assert!(held.len() >= 100, "{side}: only {} connections", held.len());
        if side == "agent" {
            // The agent goes away while kas is exhausted; a new replica must connect
            // once descriptors are free again.
            env.agents[0].kill();
        }
        // kas is out of descriptors now (its accepts fail) but must still run.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            alive(&mut env),
            "kas exited while {side} connections held its descriptors:\n{}",
            env.logs()
        );
        drop(held);
        if side == "agent" {
            env.agents.clear();
            env.start_agentk(&token, &[]);
        }
        env.wait_connected(agent, 1);
        let code = proxy_get(&env, agent, &job.token).await;
        assert_eq!(code, 200, "{side}: kas did not recover:\n{}", env.logs());
        assert!(alive(&mut env));
        let m = scrape(&info.observability).await;
        let errors: f64 = ["agent", "k8s_proxy", "api", "observability"]
            .iter()
            .map(|l| {
                sample(
                    &m,
                    &format!("kas_listener_accept_errors_total{{listener=\"{l}\"}}"),
                )
            })
            .sum();
        assert!(errors >= 1.0, "{side}: no accept error counted:\n{m}");
    }
    // And a real kubectl works end to end.
    let out = env.kubectl(&job, "acme/platform/agents:prod", &["get", "pods"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Agent connections reach their maximum age, get a GOAWAY and reconnect; requests
/// keep working throughout.
#[tokio::test(flavor = "multi_thread")]
async fn agent_connections_age_out_without_failing_requests() {
    let (env, agent, _) = env_with(
        "agent:\n  max_connection_age: 1s\n  max_connection_age_grace: 2s\n",
        &[],
    )
    .await;
    let job = env.start_job("acme/web/shop", None, "alice");
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            proxy_get(&env, agent, &job.token).await,
            200,
            "request {n} failed:\n{}",
            env.logs()
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = scrape(&env.kas_info.observability).await;
    let aged = sample(
        &m,
        "kas_listener_connections_closed_total{listener=\"agent\",reason=\"max_age\"}",
    );
    assert!(aged >= 2.0, "connections did not age out ({aged}):\n{m}");
}

/// A frozen agentk (SIGSTOP) stops answering HTTP/2 pings; kas drops its connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_agent_is_dropped() {
    let (env, agent, _) = env_with(
        "agent:\n  keepalive_interval: 1s\n  keepalive_timeout: 1s\n",
        &[],
    )
    .await;
    env.agents[0].signal("STOP");
    let started = Instant::now();
    let mut gone = false;
    while !gone && started.elapsed() < Duration::from_secs(10) {
        gone = env.connected(agent).is_none();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.agents[0].signal("CONT");
    assert!(gone, "the frozen agent is still connected:\n{}", env.logs());
    // Thawed, it reconnects.
    env.wait_connected(agent, 1);
}

/// A stream must start with its first message in time: a configuration stream without
/// its acknowledgement and a tunnel without its Hello are ended.
#[tokio::test(flavor = "multi_thread")]
async fn agents_must_send_their_first_messages_in_time() {
    use kas_proto::v1::{AgentFrame, ConfigAck};
    use kas_test_support::grpc::{agent_client, agent_request};
    let (env, _, token) = env_with("agent:\n  handshake_timeout: 300ms\n", &[]).await;
    let token = std::fs::read_to_string(&token).expect("token");
    let mut client = agent_client(&env.kas_info.agent).await;
    // Configuration stream: nothing sent.
    let silent = futures::stream::pending::<ConfigAck>();
    let started = Instant::now();
    let status = match client
        .configure(agent_request(&token, "silent", silent))
        .await
    {
        Err(s) => s,
        Ok(r) => {
            let mut inbound = r.into_inner();
            match inbound.message().await {
                Err(s) => s,
                Ok(m) => panic!("configuration stream went on: {m:?}"),
            }
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // A proper configuration stream, then a tunnel that never says Hello.
    let (ack_tx, ack_rx) = tokio::sync::mpsc::channel(1);
    ack_tx
        .send(ConfigAck {
            protocol_version: kas_proto::PROTOCOL_VERSION,
            applied_version: 0,
            agent_version: "test".into(),
            meta: None,
        })
        .await
        .expect("ack");
    let mut configs = client
        .configure(agent_request(
            &token,
            "silent",
            tokio_stream::wrappers::ReceiverStream::new(ack_rx),
        ))
        .await
        .expect("configure")
        .into_inner();
    configs
        .message()
        .await
        .expect("config")
        .expect("first config");
    let silent = futures::stream::pending::<AgentFrame>();
    let status = match client.tunnel(agent_request(&token, "silent", silent)).await {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.expect_err("tunnel went on"),
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    drop(ack_tx);
}
