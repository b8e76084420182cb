//! agentk in a cluster that authorizes with RBAC (the test API server checks every
//! request and every impersonation as kube-apiserver does): the agentk chart's and
//! the plain manifest's default RBAC make every `access_as` mode work, without the
//! impersonation role `ci_job` fails with the cluster's 403, and the chart's
//! least-privilege values allow only the names they list.

use kas_test_support::fixture::{Env, Job};
use kas_test_support::pods::{helm_template, workspace_file};
use kas_test_support::User;
use std::path::Path;

const CONFIG: &str = "ci_access:
  projects:
    - id: acme/ci
      access_as:
        ci_job: {}
    - id: acme/static
      access_as:
        impersonate:
          username: deployer
          groups: [deployers]
          extra:
            - key: team
              val: [web]
    - id: acme/plain
";

/// Roles for the identities the agent impersonates, as a cluster admin would bind them.
const BINDINGS: &str = "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: ci-job-view}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{kind: Group, name: 'gitlab:ci_job'}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: deployer-view}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{kind: User, name: deployer}]
";

fn apply(env: &Env, name: &str, yaml: &str) {
    let f = env.path(name);
    std::fs::write(&f, yaml).expect("write");
    env.admin_kubectl(&["apply", "-f", f.to_str().expect("path")]);
}

/// kas, the agent registered with [`CONFIG`], and a job of each project.
async fn setup() -> (Env, [Job; 3], String) {
    let env = Env::start_rbac(&[]).await;
    for p in ["acme/ci", "acme/static", "acme/plain"] {
        env.kasctl(&["project", "create", p]);
    }
    let (agent, token) = env.create_agent("acme/agents", "prod", CONFIG);
    let jobs = ["acme/ci", "acme/static", "acme/plain"].map(|p| env.start_job(p, None, "alice"));
    let _ = agent;
    let token = token.to_str().expect("path").to_string();
    (env, jobs, token)
}

/// Starts agentk as service account `ns/sa` of the cluster.
fn start_agent_as(env: &mut Env, token_file: &str, ns: &str, sa: &str) {
    let cluster_token = env.api.add_token(User::service_account(ns, sa));
    std::fs::write(
        &env.cluster_kubeconfig,
        env.api.kubeconfig_for(&cluster_token),
    )
    .expect("kubeconfig");
    env.start_agentk(Path::new(token_file), &[]);
}

/// `kubectl get pods` as `job`: its output, or the error it printed.
fn get_pods(env: &Env, job: &Job) -> Result<String, String> {
    let out = env.kubectl(job, "acme/agents:prod", &["get", "pods", "-n", "default"]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn agent_id(env: &Env) -> u64 {
    env.kasctl_json(&["agent", "list"])[0]["id"]
        .as_u64()
        .expect("agent id")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_rbac_makes_every_access_as_mode_work() {
    let (mut env, [ci, stat, plain], token) = setup().await;
    let chart = helm_template(
        "agentk",
        "prod",
        "gitlab-agent",
        &[
            ("kasAddress".to_string(), "grpc://kas:8150".to_string()),
            ("token".to_string(), "t".to_string()),
        ],
    )
    .expect("renders");
    apply(&env, "chart.yaml", &chart);
    apply(&env, "bindings.yaml", BINDINGS);
    start_agent_as(&mut env, &token, "gitlab-agent", "prod-agentk");
    env.wait_connected(agent_id(&env), 1);
    for job in [&ci, &stat, &plain] {
        let pods = get_pods(&env, job).unwrap_or_else(|e| panic!("{e}\n{}", env.logs()));
        assert!(pods.contains("web-0"), "{pods}");
    }
    let seen = env.api.recorded_for("/api/v1/namespaces/default/pods");
    assert!(seen
        .iter()
        .any(|r| r.impersonate_user.as_deref() == Some("deployer")));
    assert!(seen
        .iter()
        .all(|r| r.authenticated_as == "system:serviceaccount:gitlab-agent:prod-agentk"));

    // Without the impersonation role, the cluster refuses ci_job (and the job sees why).
    env.admin_kubectl(&[
        "delete",
        "clusterrolebinding",
        "gitlab-agent-prod-agentk-impersonate",
    ]);
    let err = get_pods(&env, &ci).expect_err("no impersonation allowed");
    assert!(
        err.contains("cannot impersonate resource \"users\""),
        "{err}"
    );
    assert!(
        get_pods(&env, &plain).is_ok(),
        "the agent's own identity still works"
    );

    // Least privilege: only the static identity's names.
    let narrow = helm_template(
        "agentk",
        "prod",
        "gitlab-agent",
        &[
            ("kasAddress".to_string(), "grpc://kas:8150".to_string()),
            ("token".to_string(), "t".to_string()),
            (
                "rbac.impersonate.users[0]".to_string(),
                "deployer".to_string(),
            ),
            (
                "rbac.impersonate.groups[0]".to_string(),
                "deployers".to_string(),
            ),
            (
                "rbac.impersonate.extraKeys[0]".to_string(),
                "team".to_string(),
            ),
        ],
    )
    .expect("renders");
    apply(&env, "narrow.yaml", &narrow);
    assert!(get_pods(&env, &stat).is_ok());
    let err = get_pods(&env, &ci).expect_err("ci_job names are not listed");
    assert!(
        err.contains("cannot impersonate resource \"users\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plain_manifest_rbac_makes_every_access_as_mode_work() {
    let (mut env, jobs, token) = setup().await;
    let manifest =
        std::fs::read_to_string(workspace_file("deploy/agentk/agentk.yaml")).expect("manifest");
    apply(&env, "agentk.yaml", &manifest);
    apply(&env, "bindings.yaml", BINDINGS);
    start_agent_as(&mut env, &token, "gitlab-agent", "agentk");
    env.wait_connected(agent_id(&env), 1);
    for job in &jobs {
        get_pods(&env, job).unwrap_or_else(|e| panic!("{e}"));
    }
}
