//! Ruby's kubeclient, the client library the seeds' application uses, through kas.
//! Needs Debian's `ruby-kubeclient` (`.ci/run` installs it).

use kas_test_support::fixture::Env;
use std::process::Command;

fn kubeclient(env: &Env, token: &str, expect: &str) -> (bool, String) {
    let ca = env.path("proxy-ca.pem");
    std::fs::write(&ca, env.proxy_ca()).expect("write CA");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kubeclient_check.rb");
    let out = Command::new("ruby")
        .args([
            script,
            &env.proxy_url(),
            ca.to_str().expect("path"),
            token,
            expect,
        ])
        .output()
        .expect("ruby is required: apt-get install ruby-kubeclient");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("cannot load such file -- kubeclient"),
        "ruby-kubeclient is not installed: apt-get install ruby-kubeclient"
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ruby_kubeclient_through_kas() {
    let mut env = Env::start().await;
    let (agent, token) = env.create_agent(
        "acme/agents",
        "prod",
        "ci_access:\n  projects:\n    - id: acme/shop\n      access_as:\n        ci_job: {}\n",
    );
    env.kasctl(&["project", "create", "acme/shop"]);
    env.kasctl(&["project", "create", "acme/other"]);
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 1);

    let job = env.start_job("acme/shop", None, "alice");
    let (ok, out) = kubeclient(&env, &format!("ci:{agent}:{}", job.token), "ok");
    assert!(ok, "{out}\n{}", env.logs());
    assert!(out.contains("pods: web-0,web-1"), "{out}");
    assert!(out.contains("got: v"), "{out}");
    let r = env
        .api
        .recorded_for("/api/v1/namespaces/default/configmaps");
    assert_eq!(r[0].method, "POST");
    assert_eq!(
        r[0].impersonate_user.as_deref(),
        Some(format!("gitlab:ci_job:{}", job.id).as_str())
    );

    let other = env.start_job("acme/other", None, "eve");
    let (ok, out) = kubeclient(&env, &format!("ci:{agent}:{}", other.token), "forbidden");
    assert!(ok, "{out}");
    assert!(
        out.contains("does not authorize project acme/other"),
        "{out}"
    );
}
