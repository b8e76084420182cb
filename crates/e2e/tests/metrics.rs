//! kas's Prometheus metrics move as agents connect, requests flow and configurations
//! are pushed.

use kas_test_support::fixture::{wait_for, Env};
use kas_test_support::http;
use std::time::Duration;

use http::sample;

async fn scrape(env: &Env) -> String {
    http::scrape(&env.kas_info.observability).await
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_agents_and_requests() {
    let mut env = Env::start().await;
    let before = scrape(&env).await;
    assert_eq!(sample(&before, "kas_agents_connected"), 0.0, "{before}");
    assert!(
        before.contains("# TYPE kas_k8s_proxy_requests counter"),
        "{before}"
    );

    let config = "ci_access:\n  projects:\n    - id: acme/web/shop\n";
    let (agent, token) = env.create_agent("acme/platform/agents", "prod", config);
    env.kasctl(&["project", "create", "acme/web/shop"]);
    let i = env.start_agentk(&token, &["--listen-observability", "127.0.0.1:0"]);
    env.wait_connected(agent, 1);
    // agentk's own endpoint, at the address it logs.
    let agentk_url = wait_for(
        Duration::from_secs(10),
        "agentk observability address",
        || {
            let logs = env.agents[i].logs();
            let at = logs.find("listening observability http://")?;
            let rest = &logs[at + "listening observability ".len()..];
            Some(rest.split_whitespace().next()?.to_string())
        },
    );
    let c0 = http::client(&[], false);
    assert_eq!(
        http::get(&c0, &format!("{agentk_url}/readyz"), None)
            .await
            .0,
        200
    );
    let (_, agentk_metrics) = http::get(&c0, &format!("{agentk_url}/metrics"), None).await;
    assert_eq!(
        sample(&agentk_metrics, "agentk_sessions_connected"),
        1.0,
        "{agentk_metrics}"
    );
    assert!(
        sample(&agentk_metrics, "agentk_tunnels_idle") >= 1.0,
        "{agentk_metrics}"
    );
    assert!(
        sample(&agentk_metrics, "agentk_config_version") >= 1.0,
        "{agentk_metrics}"
    );
    let connected = scrape(&env).await;
    assert_eq!(
        sample(&connected, "kas_agents_connected"),
        1.0,
        "{connected}"
    );
    assert_eq!(sample(&connected, "kas_agent_replicas_connected"), 1.0);
    assert!(sample(&connected, "kas_tunnels_idle") >= 1.0, "{connected}");
    let pushes = sample(&connected, "kas_config_pushes_total");
    assert!(pushes >= 1.0, "{connected}");

    let job = env.start_job("acme/web/shop", None, "alice");
    let c = http::client(&env.proxy_ca(), false);
    let url = format!("{}/api/v1/namespaces/default/pods", env.proxy_url());
    let bearer = format!("ci:{agent}:{}", job.token);
    assert_eq!(http::get(&c, &url, Some(&bearer)).await.0, 200);
    assert_eq!(http::get(&c, &url, Some(&bearer)).await.0, 200);
    assert_eq!(http::get(&c, &url, Some("ci:1:nope")).await.0, 401);
    let after = scrape(&env).await;
    assert_eq!(
        sample(
            &after,
            r#"kas_k8s_proxy_requests_total{code="200",access_as="agent"}"#
        ),
        2.0,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"kas_k8s_proxy_requests_total{code="401",access_as="none"}"#
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, "kas_k8s_proxy_request_duration_seconds_count"),
        3.0
    );

    // A configuration change is pushed to the connected replica.
    env.set_config("acme/platform/agents", "prod", config);
    wait_for(Duration::from_secs(5), "a config push", || {
        let rt = tokio::runtime::Handle::current();
        let now = tokio::task::block_in_place(|| rt.block_on(scrape(&env)));
        (sample(&now, "kas_config_pushes_total") > pushes).then_some(())
    });

    // The agent goes away: the gauges follow.
    env.agents[0].kill();
    wait_for(Duration::from_secs(10), "agent gone", || {
        let rt = tokio::runtime::Handle::current();
        let now = tokio::task::block_in_place(|| rt.block_on(scrape(&env)));
        (sample(&now, "kas_agents_connected") == 0.0).then_some(())
    });
}
