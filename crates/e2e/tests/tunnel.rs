//! The tunnel under load and failure: large streams with bounded memory, concurrency,
//! cancellation, restarts of either side, and configuration changes.

use bytes::Bytes;
use http_body_util::BodyExt;
use kas_test_support::fixture::{wait_for, Env, Job};
use kas_test_support::http;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

async fn setup() -> (Env, u64, Job) {
    let mut env = Env::start().await;
    let (agent, token) = env.create_agent(
        "acme/agents",
        "prod",
        "ci_access:\n  projects:\n    - id: acme/shop\n",
    );
    env.kasctl(&["project", "create", "acme/shop"]);
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 1);
    let job = env.start_job("acme/shop", None, "alice");
    (env, agent, job)
}

fn bearer(agent: u64, job: &Job) -> String {
    format!("ci:{agent}:{}", job.token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_100_mib_with_bounded_memory_and_backpressure() {
    let (env, agent, job) = setup().await;
    let c = http::client(&env.proxy_ca(), false);
    let url = format!("{}/_test/bytes?n={}", env.proxy_url(), 100 * MIB);
    let kas_before = env.kas.peak_rss_kib();
    let agent_before = env.agents[0].peak_rss_kib();

    // A reader that stops: the upstream must stop too (backpressure), far short of 100 MiB.
    let resp = http::send(&c, &url, Some(&bearer(agent, &job))).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while got < MIB {
        let f = body.frame().await.expect("frame").expect("data");
        got += f.into_data().map(|d: Bytes| d.len() as u64).unwrap_or(0);
    }
    let mut last = env.api.bytes_served();
    let mut stable_since = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "the upstream to stop while the client does not read",
        || {
            let now = env.api.bytes_served();
            if now != last {
                last = now;
                stable_since = Instant::now();
            }
            (stable_since.elapsed() > Duration::from_millis(300)).then_some(())
        },
    );
    assert!(
        last < 40 * MIB,
        "{} MiB left the upstream for a client that read 1 MiB",
        last / MIB
    );
    // Read the rest at full speed.
    while let Some(f) = body.frame().await {
        got += f
            .expect("data")
            .into_data()
            .map(|d| d.len() as u64)
            .unwrap_or(0);
    }
    assert_eq!(got, 100 * MIB);
    let kas_growth = env.kas.peak_rss_kib().saturating_sub(kas_before) / 1024;
    let agent_growth = env.agents[0].peak_rss_kib().saturating_sub(agent_before) / 1024;
    assert!(
        kas_growth < 48,
        "kas peak RSS grew by {kas_growth} MiB for a 100 MiB stream"
    );
    assert!(
        agent_growth < 48,
        "agentk peak RSS grew by {agent_growth} MiB for a 100 MiB stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_requests() {
    let (env, agent, job) = setup().await;
    let c = http::client(&env.proxy_ca(), true);
    let url = format!("{}/api/v1/namespaces/default/pods", env.proxy_url());
    let token = bearer(agent, &job);
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (c, url, token) = (c.clone(), url.clone(), token.clone());
            tokio::spawn(async move { http::get(&c, &url, Some(&token)).await })
        })
        .collect();
    for t in tasks {
        let (code, body) = t.await.expect("task");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"PodList\""), "{body}");
    }
    // Every tunnel is free again.
    wait_for(Duration::from_secs(10), "tunnels to be released", || {
        (env.connected(agent)?["busy_tunnels"].as_u64()? == 0).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancel_mid_body_frees_the_tunnel() {
    let (env, agent, job) = setup().await;
    let c = http::client(&env.proxy_ca(), true);
    let resp = http::send(
        &c,
        &format!("{}/_test/stream", env.proxy_url()),
        Some(&bearer(agent, &job)),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    for _ in 0..3 {
        body.frame().await.expect("frame").expect("data");
    }
    assert_eq!(*env.api.active_streams().borrow(), 1);
    assert_eq!(env.connected(agent).expect("connected")["busy_tunnels"], 1);
    drop(body);
    // The cancellation travels kas -> agent -> cluster: the upstream stream closes.
    let mut streams = env.api.active_streams();
    tokio::time::timeout(Duration::from_secs(10), streams.wait_for(|n| *n == 0))
        .await
        .expect("the upstream stream was not closed")
        .expect("watch");
    wait_for(Duration::from_secs(10), "the tunnel to be released", || {
        (env.connected(agent)?["busy_tunnels"].as_u64()? == 0).then_some(())
    });
    let (code, _) = http::get(
        &c,
        &format!("{}/api/v1/pods", env.proxy_url()),
        Some(&bearer(agent, &job)),
    )
    .await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_and_kas_restart_reconnect_automatically() {
    let (mut env, agent, job) = setup().await;
    let token_file = env.path(&format!("agent-{agent}.token"));
    let c = http::client(&env.proxy_ca(), false);
    let url = format!("{}/api/v1/namespaces/default/pods", env.proxy_url());

    // Agent restart: the old replica disappears, the new one serves.
    env.agents[0].kill();
    wait_for(
        Duration::from_secs(10),
        "the dead replica to be forgotten",
        || env.connected(agent).is_none().then_some(()),
    );
    env.start_agentk(&token_file, &[]);
    env.wait_connected(agent, 1);
    assert_eq!(http::get(&c, &url, Some(&bearer(agent, &job))).await.0, 200);

    // kas killed and restarted on the same data dir and ports: the agent comes back
    // by itself and the running job's token still works.
    env.restart_kas(true);
    env.wait_connected(agent, 1);
    let c = http::client(&env.proxy_ca(), false);
    let (code, body) = http::get(&c, &url, Some(&bearer(agent, &job))).await;
    assert_eq!(code, 200, "{body}\n{}", env.logs());

    // Graceful kas restart (SIGTERM) too.
    env.restart_kas(false);
    env.wait_connected(agent, 1);
    assert_eq!(http::get(&c, &url, Some(&bearer(agent, &job))).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_change_reaches_the_running_agent_within_5_seconds() {
    let (env, agent, _job) = setup().await;
    let replica_version = || env.connected(agent)?["replicas"][0]["config_version"].as_u64();
    assert_eq!(replica_version(), Some(1));
    let started = Instant::now();
    let v = env.set_config(
        "acme/agents",
        "prod",
        "ci_access:\n  groups:\n    - id: acme\n",
    );
    assert_eq!(v, 2);
    wait_for(
        Duration::from_secs(5),
        "the agent to apply configuration version 2",
        || (replica_version()? == 2).then_some(()),
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // And the agent says so in its log.
    wait_for(Duration::from_secs(5), "agentk's log line", || {
        env.agents[0].logs().contains("version=2").then_some(())
    });
    // Invalid configurations are refused with the field named, and change nothing.
    let f = env.path("bad.yaml");
    std::fs::write(
        &f,
        "ci_access:\n  projects:\n    - id: acme/x\n      access_as: {root: {}}\n",
    )
    .expect("write");
    let out = kas_test_support::procs::kasctl_raw(
        &env.kas_info,
        &[
            "agent",
            "config",
            "set",
            "acme/agents",
            "prod",
            f.to_str().expect("path"),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ci_access.projects[0].access_as"), "{err}");
    assert_eq!(replica_version(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_agent_token_gets_a_clear_error_and_backs_off() {
    let mut env = Env::start().await;
    let bad = env.path("bad.token");
    std::fs::write(&bad, "kasagent-not-a-real-token").expect("write");
    let i = env.start_agentk(&bad, &[]);
    wait_for(
        Duration::from_secs(20),
        "agentk to report the rejected token twice",
        || {
            (env.agents[i]
                .logs()
                .matches("kas rejected the agent token")
                .count()
                >= 2)
                .then_some(())
        },
    );
    let logs = env.agents[i].logs();
    assert!(logs.contains("invalid agent token"), "{logs}");
    assert!(
        !logs.contains("kasagent-not-a-real-token"),
        "the token must not be logged"
    );
    // Backing off: at most a couple of attempts in this time, not a tight loop.
    assert!(logs.matches("reconnecting to kas").count() < 6, "{logs}");
    assert_eq!(
        env.kasctl_json(&["agents"]).as_array().map(Vec::len),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_failing_mid_body_aborts_the_client_response() {
    let (env, agent, job) = setup().await;
    let c = http::client(&env.proxy_ca(), false);
    let resp = http::send(
        &c,
        &format!("{}/_test/abort", env.proxy_url()),
        Some(&bearer(agent, &job)),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0usize;
    let failed = loop {
        match body.frame().await {
            Some(Ok(f)) => got += f.into_data().map(|d| d.len()).unwrap_or(0),
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    assert!(
        failed,
        "the client saw a clean end after {got} bytes of a failed response"
    );
    assert!(got <= 64 * 1024);
    // The tunnel is not reused for a broken exchange, and the next request works.
    let (code, _) = http::get(
        &c,
        &format!("{}/api/v1/pods", env.proxy_url()),
        Some(&bearer(agent, &job)),
    )
    .await;
    assert_eq!(code, 200);
    // The upstream error text stays in the agent's own log; kas never sees it.
    assert!(!env.kas.logs().contains("secret detail"));
}
