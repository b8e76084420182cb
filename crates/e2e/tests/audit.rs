//! One audit record per proxied request, with the job, the agent and the identity the
//! cluster saw, queryable with `kasctl audit`.

// A story reads top to bottom as a user runs it.
#![allow(clippy::too_many_lines)]

use kas_test_support::fixture::{wait_for, Env};
use serde_json::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn every_proxied_request_is_audited_with_its_identity() {
    let mut env = Env::start_with(&["--log-format", "json"]).await;
    env.kasctl(&["project", "create", "acme/web/shop"]);
    env.kasctl(&["project", "create", "acme/other"]);
    env.kasctl(&[
        "environment",
        "create",
        "acme/web/shop",
        "production",
        "--tier",
        "production",
    ]);
    let (agent, token) = env.create_agent(
        "acme/platform/agents",
        "prod",
        "ci_access:\n  projects:\n    - id: acme/web/shop\n      access_as:\n        ci_job: {}\n",
    );
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 1);
    let job = env.start_job("acme/web/shop", Some("production"), "alice");
    let ctx = "acme/platform/agents:prod";
    let out = env.kubectl(&job, ctx, &["get", "pods", "-n", "audited"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen_as = env.api.recorded_for("/api/v1/namespaces/audited/pods")[0]
        .impersonate_user
        .clone()
        .expect("impersonated");
    // A job of a project the agent does not allow: refused, and audited as such.
    let other = env.start_job("acme/other", None, "mallory");
    let c = kas_test_support::http::client(&env.proxy_ca(), false);
    let url = format!("{}/api/v1/namespaces/x/pods", env.proxy_url());
    let (code, _) =
        kas_test_support::http::get(&c, &url, Some(&format!("ci:{agent}:{}", other.token))).await;
    assert_eq!(code, 403);

    let job_s = job.id.to_string();
    let records = wait_for(Duration::from_secs(5), "audit records", || {
        let v = env.kasctl_json(&["audit", "--kind", "request", "--job", &job_s]);
        let list = v.as_array()?.clone();
        list.iter()
            .any(|r| r["path"] == "/api/v1/namespaces/audited/pods")
            .then_some(list)
    });
    let r: &Value = records
        .iter()
        .find(|r| r["path"] == "/api/v1/namespaces/audited/pods")
        .expect("the pods request");
    assert_eq!(r["job_id"], job.id);
    assert_eq!(r["project"], "acme/web/shop");
    assert_eq!(r["environment"], "production");
    assert_eq!(r["user"], "alice");
    assert_eq!(r["agent_id"], agent);
    assert_eq!(r["access_as"], "ci_job");
    assert_eq!(r["impersonated"]["username"], seen_as.as_str());
    assert!(r["impersonated"]["groups"]
        .as_array()
        .is_some_and(|g| g.iter().any(|g| g == "gitlab:ci_job")));
    assert_eq!(r["verb"], "list");
    assert_eq!(r["code"], 200);
    assert!(r["bytes"].as_u64().is_some_and(|b| b > 0), "{r}");
    assert!(r["duration_ms"].as_f64().is_some());
    assert_eq!(r["completed"], true);
    assert!(r["pipeline_id"].as_u64().is_some());
    // Every record of the job is one of its requests (kubectl's discovery included).
    assert!(records.iter().all(|r| r["job_id"] == job.id));

    // Filters: by project, by agent, since; the refused job appears under its project.
    let refused = env.kasctl_json(&["audit", "--kind", "request", "--project", "acme/other"]);
    let refused = refused.as_array().expect("list");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        (refused[0]["code"].as_u64(), refused[0]["user"].as_str()),
        (Some(403), Some("mallory"))
    );
    assert_eq!(refused[0]["access_as"], "none");
    let by_agent = env.kasctl_json(&["audit", "--kind", "request", "--agent", &agent.to_string()]);
    assert_eq!(by_agent.as_array().map(Vec::len), Some(records.len() + 1));
    let future = env.kasctl_json(&["audit", "--since", "9999999999"]);
    assert_eq!(future.as_array().map(Vec::len), Some(0));
    let table = env.kasctl(&["audit", "--job", &job_s, "--since", "1h"]);
    assert!(
        table.contains("ci_job") && table.contains("/api/v1/namespaces/audited/pods"),
        "{table}"
    );
    // Request log lines are JSON with the job, agent, project and request id; no
    // token appears in any log line.
    let logs = env.kas.logs();
    let line: Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| {
            v["fields"]["message"] == "k8s-proxy: request"
                && v["fields"]["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("/api/v1/namespaces/audited/pods"))
        })
        .unwrap_or_else(|| panic!("no JSON request line in:\n{logs}"));
    let f = &line["fields"];
    assert_eq!(f["job_id"], job.id, "{line}");
    assert_eq!(f["agent_id"], agent, "{line}");
    assert_eq!(f["project"], "acme/web/shop", "{line}");
    assert!(
        f["request_id"].as_str().is_some_and(|r| r.len() == 16),
        "{line}"
    );
    assert!(!logs.contains(&job.token) && !logs.contains(&other.token));
    // Tokens never reach the audit trail.
    let file =
        std::fs::read_to_string(env.path("kas-data").join("audit.jsonl")).expect("audit file");
    assert!(!file.contains(&job.token) && !file.contains(&other.token));
}
