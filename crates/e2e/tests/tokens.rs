//! Agent credentials have a lifecycle: two active tokens for rotation, revocation and
//! agent deletion that close live connections at once (on every kas replica), a
//! per-token connection rate limit shared through Redis, and an audit record of every
//! admin action.

// A story reads top to bottom as a user runs it.
#![allow(clippy::too_many_lines)]

use kas_test_support::fixture::{wait_for, Env};
use kas_test_support::replicas::Replicas;
use std::time::{Duration, Instant};

const PROJECT: &str = "acme/web/shop";
const CONFIG: &str = "ci_access:\n  projects:\n    - id: acme/web/shop\n";
const AGENT_PROJECT: &str = "acme/platform/agents";
const CONTEXT: &str = "acme/platform/agents:prod";

/// Polls `done` every 10 ms until it holds; how long that took (panics after `limit`).
fn time_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

fn kasctl_fails(env: &Env, args: &[&str]) -> String {
    let out = kas_test_support::procs::kasctl_raw(&env.kas_info, args);
    assert!(!out.status.success(), "kasctl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_rotate_and_revocation_closes_connections_at_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("kas.yaml");
    std::fs::write(&cfg, "k8s_proxy:\n  agent_wait_timeout: 1s\n").expect("config");
    let mut env = Env::start_with(&["--config", cfg.to_str().expect("path")]).await;
    env.kasctl(&["project", "create", PROJECT]);
    let (agent, first_file) = env.create_agent(AGENT_PROJECT, "prod", CONFIG);
    let first = std::fs::read_to_string(&first_file).expect("token");
    env.start_agentk(&first_file, &[]);
    env.wait_connected(agent, 1);

    // A second token for rotation; a third is refused while two are active.
    let second_file = env.path("second.token");
    let out = env.kasctl(&[
        "agent",
        "token",
        "create",
        AGENT_PROJECT,
        "prod",
        "--name",
        "rotated",
        "--write-token",
        second_file.to_str().expect("path"),
    ]);
    assert!(out.contains("token rotated"), "{out}");
    let second = std::fs::read_to_string(&second_file).expect("token");
    let err = kasctl_fails(&env, &["agent", "token", "create", AGENT_PROJECT, "prod"]);
    assert!(
        err.contains("2 active tokens") && err.contains("409"),
        "{err}"
    );

    // The list names them, says when each was last used, and never shows a secret.
    let listed = wait_for(
        Duration::from_secs(5),
        "the first token's use recorded",
        || {
            let v = env.kasctl_json(&["agent", "token", "list", AGENT_PROJECT, "prod"]);
            let list = v.as_array()?.clone();
            list[0]["last_used_at"].as_i64().map(|_| list)
        },
    );
    let names: Vec<&str> = listed.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["default", "rotated"]);
    assert!(listed[1]["last_used_at"].is_null());
    let table = env.kasctl(&["agent", "token", "list", AGENT_PROJECT, "prod"]);
    assert!(
        table.contains("LAST USED") && table.contains("active"),
        "{table}"
    );
    for shown in [table.clone(), serde_json::to_string(&listed).expect("json")] {
        assert!(!shown.contains(first.trim()) && !shown.contains(second.trim()));
    }

    // A watch in flight through the first token's connection.
    let job = env.start_job(PROJECT, None, "alice");
    let mut streams = env.api.active_streams();
    let mut watch = env
        .kubectl_cmd(
            &job,
            CONTEXT,
            &[
                "get",
                "pods",
                "-n",
                "watched",
                "--watch",
                "--request-timeout=0",
            ],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl watch");
    tokio::time::timeout(Duration::from_secs(10), streams.wait_for(|n| *n == 1))
        .await
        .expect("watch established")
        .expect("streams");

    // Revoking it closes its connection within a second; the watch ends.
    env.kasctl(&["agent", "token", "revoke", AGENT_PROJECT, "prod", "default"]);
    let closed = time_until(
        Duration::from_secs(1),
        "the revoked token's connection closed",
        || env.connected(agent).is_none(),
    );
    eprintln!("revoked token's connection closed after {closed:?}");
    let ended = time_until(Duration::from_secs(5), "the watch through it ended", || {
        matches!(watch.try_wait(), Ok(Some(_)))
    });
    eprintln!("the watch ended {ended:?} later");
    // kubectl sees the watch end as it sees a server end it (and would re-list).
    let w = watch.wait_with_output().expect("watch output");
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    tokio::time::timeout(Duration::from_secs(5), streams.wait_for(|n| *n == 0))
        .await
        .expect("the cluster request was dropped")
        .expect("streams");
    // The agent cannot come back with the revoked token.
    wait_for(Duration::from_secs(10), "agentk to be refused", || {
        env.agents[0]
            .logs()
            .contains("kas rejected the agent token")
            .then_some(())
    });
    assert!(env.connected(agent).is_none());

    // The rotated token works.
    env.start_agentk(&second_file, &[]);
    env.wait_connected(agent, 1);
    let out = env.kubectl(&job, CONTEXT, &["get", "pods"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Deleting the agent closes its connections too, and its context stops working.
    let out = env.kasctl(&["agent", "delete", AGENT_PROJECT, "prod"]);
    assert!(out.contains("deleted"), "{out}");
    time_until(
        Duration::from_secs(1),
        "the deleted agent's connection closed",
        || env.connected(agent).is_none(),
    );
    let out = env.kubectl(&job, CONTEXT, &["get", "pods"]);
    assert!(!out.status.success());
    assert!(
        env.kasctl(&["agent", "list"]).lines().count() == 1,
        "only the header is left"
    );
    env.kasctl(&["job", "finish", &job.id.to_string()]);

    // Every admin action is in the audit trail, with who did it and the outcome.
    let admin = env.kasctl_json(&["audit", "--kind", "admin"]);
    let admin = admin.as_array().expect("list");
    let actions: Vec<(&str, &str)> = admin
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap_or("-"),
                r["outcome"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    for expected in [
        ("project.create", "ok"),
        ("agent.create", "ok"),
        ("agent.config.set", "ok"),
        ("agent.token.create", "ok"),
        ("-", "failed"),
        ("job.start", "ok"),
        ("agent.token.revoke", "ok"),
        ("agent.delete", "ok"),
        ("job.finish", "ok"),
    ] {
        assert!(
            actions.contains(&expected),
            "{expected:?} missing in {actions:?}"
        );
    }
    let actor = admin[0]["actor"].as_str().expect("actor");
    assert!(
        actor.starts_with("admin-token:") && actor.len() == 20,
        "{actor}"
    );
    assert!(admin
        .iter()
        .all(|r| r["actor"] == actor && r["time"].as_f64().is_some()));
    let revoke = admin
        .iter()
        .find(|r| r["action"] == "agent.token.revoke")
        .expect("revoke record");
    assert_eq!(revoke["agent_id"], agent);
    assert_eq!(revoke["target"], CONTEXT);
    assert_eq!(revoke["details"]["token"], "default");
    let table = env.kasctl(&["audit", "--kind", "admin"]);
    assert!(
        table.contains("agent.token.revoke") && table.contains(actor),
        "{table}"
    );
    let file = std::fs::read_to_string(env.path("kas-data").join("audit.jsonl")).expect("audit");
    assert!(!file.contains(first.trim()) && !file.contains(second.trim()));
}

fn replica_config(extra: &str) -> String {
    format!("{CONFIG}{extra}")
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_token_closes_its_connections_on_every_replica() {
    let mut r = Replicas::start(2).await;
    let (agent, token) = r.create_agent(AGENT_PROJECT, "prod", &replica_config(""));
    r.start_agentk(&token, &[1]);
    r.wait_connections(1, agent, 1);
    // Revoked through kas 0; the connection is on kas 1.
    r.kasctl(
        0,
        &["agent", "token", "revoke", AGENT_PROJECT, "prod", "default"],
    );
    let closed = time_until(
        Duration::from_secs(1),
        "kas 1 to close the connection",
        || r.connections(1, agent).is_empty(),
    );
    eprintln!("closed on the other replica after {closed:?}");
    // Deleting an agent reaches every replica too.
    let (other, token) = r.create_agent(AGENT_PROJECT, "other", &replica_config(""));
    r.start_agentk(&token, &[1]);
    r.wait_connections(1, other, 1);
    r.kasctl(0, &["agent", "delete", AGENT_PROJECT, "other"]);
    time_until(
        Duration::from_secs(1),
        "kas 1 to close the deleted agent",
        || r.connections(1, other).is_empty(),
    );
}

/// Opens configuration streams with `token` on the agent listener at `url` until one
/// is refused; how many got through.
async fn streams_until_refused(
    url: &str,
    token: &str,
    most: usize,
) -> (usize, Option<tonic::Code>) {
    use kas_proto::v1::ConfigAck;
    use kas_test_support::grpc::{agent_client, agent_request};
    let mut client = agent_client(url).await;
    for n in 0..most {
        let ack = ConfigAck {
            protocol_version: kas_proto::PROTOCOL_VERSION,
            applied_version: 0,
            agent_version: "test".into(),
            meta: None,
        };
        let req = agent_request(token, &format!("r{n}"), futures::stream::iter([ack]));
        if let Err(s) = client.configure(req).await {
            return (n, Some(s.code()));
        }
    }
    (most, None)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_rate_limit_is_shared_by_the_replicas() {
    // Counts are per minute: do not straddle a minute boundary.
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() % 60)
        .unwrap_or(0);
    if second >= 45 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    let r = Replicas::start_with(2, "agent:\n  connections_per_token_per_minute: 6\n").await;
    let (_, token) = r.create_agent(AGENT_PROJECT, "prod", &replica_config(""));
    let token = std::fs::read_to_string(token).expect("token");
    let (a, refused) = streams_until_refused(&r.info[0].agent, &token, 4).await;
    assert_eq!((a, refused), (4, None));
    // Two more on the other replica, then the limit holds on both.
    let (b, refused) = streams_until_refused(&r.info[1].agent, &token, 10).await;
    assert_eq!((b, refused), (2, Some(tonic::Code::ResourceExhausted)));
    let (c, refused) = streams_until_refused(&r.info[0].agent, &token, 10).await;
    assert_eq!((c, refused), (0, Some(tonic::Code::ResourceExhausted)));
    let m = kas_test_support::http::scrape(&r.info[1].observability).await;
    assert!(kas_test_support::http::sample(&m, "kas_agent_connections_rate_limited_total") >= 1.0);
    // Another token has its own count.
    let (_, other) = r.create_agent(AGENT_PROJECT, "other", &replica_config(""));
    let other = std::fs::read_to_string(other).expect("token");
    let (d, refused) = streams_until_refused(&r.info[1].agent, &other, 10).await;
    assert_eq!((d, refused), (6, Some(tonic::Code::ResourceExhausted)));
}
