//! The authorization matrix through the real proxy: status codes and Status bodies.

use kas_test_support::fixture::Env;
use kas_test_support::http;
use serde_json::Value;

async fn call(env: &Env, c: &http::HttpsClient, token: Option<&str>) -> (u16, Value) {
    let (code, body) = http::get(
        c,
        &format!("{}/api/v1/namespaces/default/pods", env.proxy_url()),
        token,
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| {
        panic!(
            "not JSON ({code}): {body:?} for {:?}",
            token.map(|t| &t[..t.len().min(40)])
        )
    });
    (code, v)
}

fn assert_status(code: u16, v: &Value, want: u16, needle: &str) {
    assert_eq!(code, want, "{v}");
    assert_eq!(v["kind"], "Status", "{v}");
    assert_eq!(v["code"].as_u64(), Some(u64::from(want)), "{v}");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
    for secret in ["kasjob-", "sqlite", "panicked", "kas_"] {
        assert!(!msg.contains(secret), "message leaks internals: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix() {
    let mut env = Env::start().await;
    for p in [
        "group1/web/shop",
        "group1/web/review-app",
        "group1/teams/a/deep",
        "group1/unlisted",
        "other/listed",
    ] {
        env.kasctl(&["project", "create", p]);
    }
    for (p, e, t) in [
        ("group1/web/review-app", "staging", "staging"),
        ("group1/web/review-app", "review/feature-1", "development"),
        ("group1/web/review-app", "production", "production"),
    ] {
        env.kasctl(&["environment", "create", p, e, "--tier", t]);
    }
    let (agent, token) = env.create_agent(
        "group1/agents",
        "prod",
        "ci_access:\n  projects:\n    - id: group1/web/shop\n    - id: group1/web/review-app\n      environments: [staging, review/*]\n    - id: other/listed\n  groups:\n    - id: group1/teams\n",
    );
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 1);
    let c = http::client(&env.proxy_ca(), true);
    let tok = |job: &kas_test_support::fixture::Job| format!("ci:{agent}:{}", job.token);

    // Allowed project.
    let shop = env.start_job("group1/web/shop", None, "alice");
    let (code, v) = call(&env, &c, Some(&tok(&shop))).await;
    assert_eq!(code, 200, "{v}\n{}", env.logs());
    assert_eq!(v["kind"], "PodList");
    // A project inside a subgroup of an allowed group.
    let deep = env.start_job("group1/teams/a/deep", None, "bob");
    assert_eq!(call(&env, &c, Some(&tok(&deep))).await.0, 200);
    // Another root group is refused even though it is listed.
    let other = env.start_job("other/listed", None, "eve");
    let (code, v) = call(&env, &c, Some(&tok(&other))).await;
    assert_status(code, &v, 403, "root group");
    // Not listed at all.
    let unlisted = env.start_job("group1/unlisted", None, "eve");
    let (code, v) = call(&env, &c, Some(&tok(&unlisted))).await;
    assert_status(code, &v, 403, "does not authorize project group1/unlisted");
    // Environments: exact match, `review/*` wildcard, no match, no environment.
    let staging = env.start_job("group1/web/review-app", Some("staging"), "alice");
    assert_eq!(call(&env, &c, Some(&tok(&staging))).await.0, 200);
    let review = env.start_job("group1/web/review-app", Some("review/feature-1"), "alice");
    assert_eq!(call(&env, &c, Some(&tok(&review))).await.0, 200);
    let prod = env.start_job("group1/web/review-app", Some("production"), "alice");
    let (code, v) = call(&env, &c, Some(&tok(&prod))).await;
    assert_status(code, &v, 403, "production");
    let noenv = env.start_job("group1/web/review-app", None, "alice");
    let (code, v) = call(&env, &c, Some(&tok(&noenv))).await;
    assert_status(code, &v, 403, "environment");
    // The job kubeconfig lists the agent only where it is allowed.
    let kc = std::fs::read_to_string(&prod.kubeconfig).expect("kubeconfig");
    assert!(!kc.contains("group1/agents:prod"), "{kc}");
    let kc = std::fs::read_to_string(&review.kubeconfig).expect("kubeconfig");
    assert!(kc.contains("group1/agents:prod"), "{kc}");

    // `kasctl access explain` agrees with the proxy on every case above.
    let agent_s = agent.to_string();
    for (project, environment, allowed) in [
        ("group1/web/shop", None, true),
        ("group1/teams/a/deep", None, true),
        ("other/listed", None, false),
        ("group1/unlisted", None, false),
        ("group1/web/review-app", Some("staging"), true),
        ("group1/web/review-app", Some("review/feature-1"), true),
        ("group1/web/review-app", Some("production"), false),
        ("group1/web/review-app", None, false),
    ] {
        let mut args = vec![
            "access",
            "explain",
            "--project",
            project,
            "--agent",
            &agent_s,
        ];
        if let Some(e) = environment {
            args.extend(["--environment", e]);
        }
        let v = env.kasctl_json(&args);
        assert_eq!(v["allowed"], allowed, "{project} {environment:?}: {v}");
        if allowed {
            assert!(
                v["decided_by"]
                    .as_str()
                    .is_some_and(|d| d.contains("ci_access")),
                "{v}"
            );
            assert_eq!(v["access_as"], "agent", "{v}");
        } else {
            assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
        }
    }
    let text = env.kasctl(&[
        "access",
        "explain",
        "--project",
        "group1/teams/a/deep",
        "--agent",
        "group1/agents:prod",
    ]);
    assert!(
        text.contains("allowed:     yes") && text.contains("ci_access.groups[0] (group1/teams)"),
        "{text}"
    );

    // Finished job: 401 at once.
    env.kasctl(&["job", "finish", &shop.id.to_string()]);
    let (code, v) = call(&env, &c, Some(&tok(&shop))).await;
    assert_status(code, &v, 401, "no longer running");
    // Unknown agent id: refused without revealing whether the agent exists.
    let (code, v) = call(&env, &c, Some(&format!("ci:987654:{}", deep.token))).await;
    assert_status(code, &v, 403, "agent 987654");
    // Unknown job token.
    let (code, v) = call(&env, &c, Some(&format!("ci:{agent}:kasjob-notarealtoken"))).await;
    assert_status(code, &v, 401, "job token");
    // Malformed credentials.
    // Very long, but within what HTTP servers accept in a header (8 KiB).
    let long = format!("ci:{agent}:{}", "x".repeat(4_000));
    for bad in ["ci:", "ci:x:y", "", "ci:1", "ci::tok", &long] {
        let (code, v) = call(&env, &c, Some(bad)).await;
        assert_status(code, &v, 401, "ci:<agent id>:<job token>");
    }
    let (code, v) = call(&env, &c, None).await;
    assert_status(code, &v, 401, "missing credentials");
    // Nothing refused reached the cluster: only the allowed jobs' requests did.
    let reached = env
        .api
        .recorded_for("/api/v1/namespaces/default/pods")
        .len();
    assert_eq!(reached, 4, "{:?}", env.api.recorded());
}
