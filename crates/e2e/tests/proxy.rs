//! agentk behind a corporate proxy: it reaches kas only through a real forward proxy
//! (tinyproxy, started by the test) with CONNECT and basic credentials from
//! `HTTPS_PROXY`, `NO_PROXY` exempts hosts, and kubectl works end to end through it.

use kas_test_support::fixture::{wait_for, Env};
use kas_test_support::procs;
use kas_test_support::services::Tinyproxy;
use std::time::Duration;

const CREDS: (&str, &str) = ("kasuser", "s3cret-pass");

#[tokio::test(flavor = "multi_thread")]
async fn agentk_reaches_kas_through_an_authenticating_proxy() {
    let (mut env, ca) = Env::start_agent_tls().await;
    env.kasctl(&["project", "create", "acme/web/shop"]);
    let (agent, token) = env.create_agent(
        "acme/platform/agents",
        "prod",
        "ci_access:\n  projects:\n    - id: acme/web/shop\n",
    );
    let port: u16 = env
        .kas_info
        .agent
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("agent port");
    let proxy = Tinyproxy::start(Some(CREDS), &[port]);
    // A name, not an address: the proxy resolves it.
    let address = format!("grpcs://localhost:{port}");
    let args = ["--ca-cert", ca.to_str().expect("path")];
    let start = |env: &mut Env, envs: &[(&str, &str)]| {
        let a = procs::start_agentk_env(
            &address,
            &token,
            &env.cluster_kubeconfig,
            &args,
            envs,
            &env.path("logs"),
        );
        env.agents.push(a);
        env.agents.len() - 1
    };
    let connects = || {
        proxy
            .log()
            .matches(&format!("CONNECT localhost:{port}"))
            .count()
    };

    let url = proxy.url(Some(CREDS));
    start(&mut env, &[("HTTPS_PROXY", url.as_str())]);
    env.wait_connected(agent, 1);
    assert_eq!(connects(), 1, "{}", proxy.log());
    let job = env.start_job("acme/web/shop", None, "alice");
    let out = env.kubectl(&job, "acme/platform/agents:prod", &["get", "pods"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("web-0"), "{stdout}");

    // Wrong credentials: the proxy refuses, agentk says so and stays out.
    let wrong = proxy.url(Some((CREDS.0, "wrong")));
    let bad = start(&mut env, &[("https_proxy", wrong.as_str())]);
    wait_for(
        Duration::from_secs(10),
        "agentk to report the refusal",
        || {
            env.agents[bad]
                .logs()
                .contains(&format!("refused CONNECT localhost:{port}"))
                .then_some(())
        },
    );
    assert!(
        !env.agents[bad].logs().contains("wrong"),
        "the password is logged"
    );
    assert_eq!(
        env.connected(agent).expect("connected")["replicas"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    env.agents[bad].kill();

    // NO_PROXY: this host is reached directly.
    let before = connects();
    start(
        &mut env,
        &[
            ("HTTPS_PROXY", url.as_str()),
            ("NO_PROXY", "example.com,localhost"),
        ],
    );
    env.wait_connected(agent, 2);
    assert_eq!(connects(), before, "NO_PROXY went through the proxy");
}
