//! Agent connections: several replicas of one agent, and TLS on the agent listener.

use kas_test_support::fixture::{wait_for, Env};
use kas_test_support::http;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_one_token_are_one_agent_with_several_connections() {
    let mut env = Env::start().await;
    let (agent, token) = env.create_agent(
        "acme/agents",
        "prod",
        "ci_access:\n  projects:\n    - id: acme/shop\n",
    );
    env.kasctl(&["project", "create", "acme/shop"]);
    env.start_agentk(&token, &[]);
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 2);
    let listed = env.kasctl_json(&["agents"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let table = env.kasctl(&["agents"]);
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains("prod") && l.contains("acme/agents")),
        "{table}"
    );

    let job = env.start_job("acme/shop", None, "alice");
    let c = http::client(&env.proxy_ca(), true);
    let url = format!("{}/api/v1/namespaces/default/pods", env.proxy_url());
    let bearer = format!("ci:{agent}:{}", job.token);
    for _ in 0..10 {
        assert_eq!(http::get(&c, &url, Some(&bearer)).await.0, 200);
    }
    // One replica goes away: the other keeps serving.
    env.agents[0].kill();
    wait_for(
        Duration::from_secs(10),
        "the replica to be forgotten",
        || (env.connected(agent)?["replicas"].as_array()?.len() == 1).then_some(()),
    );
    for _ in 0..10 {
        assert_eq!(http::get(&c, &url, Some(&bearer)).await.0, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_connect_over_tls_with_a_self_signed_kas() {
    // A CA and a serving certificate for the agent listener.
    let (mut env, ca) = Env::start_agent_tls().await;
    assert!(
        env.kas_info.agent.starts_with("grpcs://"),
        "{}",
        env.kas_info.agent
    );
    // agentk dials by host name so the certificate's name matches.
    env.kas_info.agent = env.kas_info.agent.replace("127.0.0.1", "localhost");
    let (agent, token) = env.create_agent(
        "acme/agents",
        "prod",
        "ci_access:\n  projects:\n    - id: acme/shop\n",
    );
    env.kasctl(&["project", "create", "acme/shop"]);

    // Without the CA the agent cannot verify kas and does not connect.
    let i = env.start_agentk(&token, &[]);
    wait_for(
        Duration::from_secs(20),
        "a TLS failure in agentk's log",
        || {
            env.agents[i]
                .logs()
                .contains("cannot connect to kas")
                .then_some(())
        },
    );
    assert!(env.connected(agent).is_none());
    env.agents[i].kill();

    env.start_agentk(&token, &["--ca-cert", ca.to_str().expect("path")]);
    env.wait_connected(agent, 1);
    let job = env.start_job("acme/shop", None, "alice");
    let c = http::client(&env.proxy_ca(), false);
    let (code, body) = http::get(
        &c,
        &format!("{}/api/v1/pods", env.proxy_url()),
        Some(&format!("ci:{agent}:{}", job.token)),
    )
    .await;
    assert_eq!(code, 200, "{body}\n{}", env.logs());
}

/// A replica reports where it runs and the cluster's version; kas shows them, and warns
/// about agents whose version is too far from its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_report_where_they_run_and_version_skew_is_warned_about() {
    use kas_proto::v1::ConfigAck;
    use kas_test_support::grpc::{agent_client, agent_request};
    let mut env = Env::start().await;
    let (agent, token) = env.create_agent("acme/agents", "prod", "");
    env.start_agentk_env(
        &token,
        &[],
        &[
            ("POD_NAME", "agentk-7d9f-x2x"),
            ("POD_NAMESPACE", "gitlab-agent"),
            ("NODE_NAME", "node-a"),
        ],
    );
    env.wait_connected(agent, 1);
    let r = env.connected(agent).expect("connected")["replicas"][0].clone();
    assert_eq!(r["pod_name"], "agentk-7d9f-x2x");
    assert_eq!(r["pod_namespace"], "gitlab-agent");
    assert_eq!(r["node_name"], "node-a");
    assert_eq!(r["kubernetes_version"], "v1.32.0-kas-test-apiserver");
    assert!(r.get("warning").is_none(), "{r}");
    let table = env.kasctl(&["agents", "--replicas"]);
    for shown in [
        "agentk-7d9f-x2x",
        "gitlab-agent",
        "node-a",
        "v1.32.0-kas-test-apiserver",
    ] {
        assert!(table.contains(shown), "{shown} missing:\n{table}");
    }
    assert!(env
        .kasctl(&["agents"])
        .contains("v1.32.0-kas-test-apiserver"));

    // An agent of a far newer version: served, with a warning.
    let token = std::fs::read_to_string(&token).expect("token");
    let mut client = agent_client(&env.kas_info.agent).await;
    let ack = ConfigAck {
        protocol_version: kas_proto::PROTOCOL_VERSION,
        applied_version: 0,
        agent_version: "9.4.0".into(),
        meta: None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ack).await.expect("ack");
    let mut req = agent_request(
        &token,
        "newer",
        tokio_stream::wrappers::ReceiverStream::new(rx),
    );
    req.metadata_mut().insert(
        kas_proto::AGENT_VERSION_METADATA,
        "9.4.0".parse().expect("md"),
    );
    let mut configs = client.configure(req).await.expect("served").into_inner();
    configs.message().await.expect("config").expect("first");
    wait_for(Duration::from_secs(5), "both replicas listed", || {
        (env.connected(agent)?["replicas"].as_array()?.len() == 2).then_some(())
    });
    let out = kas_test_support::procs::kasctl_raw(&env.kas_info, &["agents"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("replica newer") && err.contains("more than one minor version away"),
        "{err}"
    );
    assert!(env.kas.logs().contains("more than one minor version away"));
    drop(tx);
}
