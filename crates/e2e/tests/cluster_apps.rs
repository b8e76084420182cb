//! kas's own work in an agent's cluster, through the agent: managed applications run
//! by install pods in gitlab-managed-apps (followed with real kubectl through kas, as
//! the seeds describe), and namespaces made for CI jobs' environments, enforced by the
//! test API server's RBAC.
#![allow(clippy::too_many_lines)]

use kas_test_support::fixture::{wait_for, Env};
use kas_test_support::procs;
use serde_json::Value;
use std::time::Duration;

const NS: &str = "gitlab-managed-apps";
const AGENT: &str = "acme/platform/agents:prod";
const CONFIG: &str = "ci_access:\n  projects:\n    - id: acme/web/shop\n";

/// kas with one connected agent whose configuration is `config`.
async fn connected(config: &str) -> Env {
    let mut env = Env::start().await;
    env.kasctl(&["project", "create", "acme/web/shop"]);
    let (agent, token) = env.create_agent("acme/platform/agents", "prod", config);
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 1);
    env
}

/// The application's record (`Null` while it has none).
fn app(env: &Env, name: &str) -> Value {
    let list = env.kasctl_json(&["cluster", "app", "list", AGENT]);
    list["apps"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

fn wait_state(env: &Env, name: &str, state: &str) -> Value {
    wait_for(Duration::from_secs(30), state, || {
        let a = app(env, name);
        (a["state"] == state).then_some(a)
    })
}

fn pod(env: &Env, name: &str) -> Option<Value> {
    env.api.object("", "pods", NS, name)
}

#[tokio::test(flavor = "multi_thread")]
async fn managed_apps_install_fail_upgrade_and_uninstall_through_pods() {
    let env = connected(CONFIG).await;
    let values = env.path("values.yaml");
    std::fs::write(&values, "controller:\n  replicaCount: 3\n").expect("values");
    let log = "Release \"ingress-nginx\" does not exist. Installing it now.\nSTATUS: deployed\n";
    env.api.plan_pod(
        NS,
        "install-ingress-nginx",
        "Running@50,Succeeded@1500",
        log,
    );
    let out = env.kasctl(&[
        "cluster",
        "app",
        "install",
        AGENT,
        "ingress-nginx",
        "--values",
        values.to_str().expect("path"),
    ]);
    assert!(
        out.contains("install of ingress-nginx 4.12.1 started"),
        "{out}"
    );
    assert_eq!(app(&env, "ingress-nginx")["state"], "installing");

    // The seed's way of watching an install: kubectl logs --follow, through kas.
    wait_for(Duration::from_secs(10), "install pod", || {
        pod(&env, "install-ingress-nginx")
    });
    let job = env.start_job("acme/web/shop", None, "alice");
    let followed = env.kubectl(
        &job,
        AGENT,
        &["logs", "install-ingress-nginx", "--follow", "-n", NS],
    );
    assert!(
        followed.status.success(),
        "{}",
        String::from_utf8_lossy(&followed.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&followed.stdout), log);

    let installed = wait_state(&env, "ingress-nginx", "installed");
    assert_eq!(installed["version"], "4.12.1");
    assert!(
        pod(&env, "install-ingress-nginx").is_none(),
        "a pod that succeeded is removed"
    );
    let cm = env
        .api
        .object("", "configmaps", NS, "values-ingress-nginx")
        .expect("values");
    assert_eq!(
        cm["data"]["values.yaml"],
        "controller:\n  replicaCount: 3\n"
    );
    assert!(cm["data"]["defaults.yaml"]
        .as_str()
        .unwrap_or("")
        .contains("LoadBalancer"));
    assert!(env
        .api
        .object("", "serviceaccounts", NS, "kas-installer")
        .is_some());
    let binding = env
        .api
        .object(
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            "",
            "gitlab-managed-apps-kas-installer",
        )
        .expect("installer binding");
    assert_eq!(binding["subjects"][0]["name"], "kas-installer");
    // The agents page shows it.
    let admin = std::fs::read_to_string(&env.kas_info.admin_token_file).expect("admin token");
    let http = kas_test_support::http::client(b"", false);
    let page_url = format!("{}/ui/agents", env.kas_info.api);
    let (status, page) = kas_test_support::http::get(&http, &page_url, Some(admin.trim())).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("ingress-nginx: <span class=on>installed</span> 4.12.1"),
        "{page}"
    );
    let kas_log = env.kas.logs();
    assert!(
        kas_log.contains("STATUS: deployed"),
        "the pod's log is in the integration log"
    );

    // A second install is refused; an unknown application is named.
    let refused = procs::kasctl_raw(
        &env.kas_info,
        &["cluster", "app", "install", AGENT, "ingress-nginx"],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr)
        .contains("already installed (version 4.12.1); use upgrade"));
    let unknown = procs::kasctl_raw(&env.kas_info, &["cluster", "app", "install", AGENT, "nope"]);
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no application `nope` in the catalogue")
    );

    // An upgrade that fails: errored with Helm's exit code, its pod kept for its log.
    env.api.plan_pod(
        NS,
        "upgrade-ingress-nginx",
        "Running@50,Failed@300",
        "Error: UPGRADE FAILED\n",
    );
    env.kasctl(&[
        "cluster",
        "app",
        "upgrade",
        AGENT,
        "ingress-nginx",
        "--version",
        "4.12.2",
    ]);
    let errored = wait_state(&env, "ingress-nginx", "errored");
    assert_eq!(errored["error_code"], "helm_exit_1");
    assert!(
        pod(&env, "upgrade-ingress-nginx").is_some(),
        "a failed pod is kept"
    );
    let kept_log = env.kubectl(&job, AGENT, &["logs", "upgrade-ingress-nginx", "-n", NS]);
    assert_eq!(
        String::from_utf8_lossy(&kept_log.stdout),
        "Error: UPGRADE FAILED\n"
    );

    // Again, running until the test says: nothing else may start meanwhile.
    env.api
        .plan_pod(NS, "upgrade-ingress-nginx", "Running@50", "");
    env.kasctl(&[
        "cluster",
        "app",
        "upgrade",
        AGENT,
        "ingress-nginx",
        "--version",
        "4.12.2",
    ]);
    wait_for(Duration::from_secs(10), "a new upgrade pod", || {
        pod(&env, "upgrade-ingress-nginx").filter(|p| p["status"]["phase"] == "Running")
    });
    let busy = procs::kasctl_raw(
        &env.kas_info,
        &["cluster", "app", "uninstall", AGENT, "ingress-nginx"],
    );
    assert!(!busy.status.success());
    let why = String::from_utf8_lossy(&busy.stderr);
    assert!(
        why.contains("is upgrading (pod upgrade-ingress-nginx)") && why.contains("409"),
        "{why}"
    );
    assert!(env
        .api
        .set_pod_phase(NS, "upgrade-ingress-nginx", "Succeeded"));
    let upgraded = wait_state(&env, "ingress-nginx", "installed");
    assert_eq!(upgraded["version"], "4.12.2");
    assert_eq!(upgraded["error_code"], Value::Null);

    env.api.plan_pod(
        NS,
        "uninstall-ingress-nginx",
        "Running@50,Succeeded@200",
        "release uninstalled\n",
    );
    env.kasctl(&["cluster", "app", "uninstall", AGENT, "ingress-nginx"]);
    wait_state(&env, "ingress-nginx", "uninstalled");
    assert!(env
        .api
        .object("", "configmaps", NS, "values-ingress-nginx")
        .is_none());
    let table = env.kasctl(&["cluster", "app", "list", AGENT]);
    assert!(
        table.contains("uninstalled") && table.contains("cert-manager"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_kas_goes_on_following_a_running_install_pod() {
    let mut env = connected(CONFIG).await;
    env.api
        .plan_pod(NS, "install-cert-manager", "Running@50", "");
    env.kasctl(&["cluster", "app", "install", AGENT, "cert-manager"]);
    wait_for(Duration::from_secs(10), "install pod running", || {
        pod(&env, "install-cert-manager").filter(|p| p["status"]["phase"] == "Running")
    });
    env.restart_kas(false);
    assert_eq!(app(&env, "cert-manager")["state"], "installing");
    assert!(env
        .api
        .set_pod_phase(NS, "install-cert-manager", "Succeeded"));
    let a = wait_state(&env, "cert-manager", "installed");
    assert_eq!(a["version"], "v1.17.2");
    assert!(pod(&env, "install-cert-manager").is_none());

    // Killed, kas cannot hand over: the next one takes over once the lease runs out.
    env.api.plan_pod(NS, "install-prometheus", "Running@50", "");
    env.kasctl(&["cluster", "app", "install", AGENT, "prometheus"]);
    wait_for(Duration::from_secs(10), "install pod running", || {
        pod(&env, "install-prometheus").filter(|p| p["status"]["phase"] == "Running")
    });
    env.restart_kas(true);
    assert!(env.api.set_pod_phase(NS, "install-prometheus", "Failed"));
    let a = wait_for(Duration::from_secs(45), "taken over after a crash", || {
        let a = app(&env, "prometheus");
        (a["state"] == "errored").then_some(a)
    });
    assert_eq!(a["error_code"], "helm_exit_1");
    assert!(
        pod(&env, "install-prometheus").is_some(),
        "kept for its log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn managed_namespaces_confine_ci_jobs_to_their_environment() {
    let config = "ci_access:
  projects:
    - id: acme/web/shop
      access_as:
        ci_job: {}
managed_namespaces:
  cluster_role: admin
";
    let mut env = Env::start_rbac(&[]).await;
    env.kasctl(&["project", "create", "acme/web/shop"]);
    env.kasctl(&["environment", "create", "acme/web/shop", "production"]);
    let (agent, token) = env.create_agent("acme/platform/agents", "prod", config);
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 1);

    // Without rights to make namespaces, the job does not start (no useless kubeconfig).
    let refused = procs::kasctl_raw(
        &env.kas_info,
        &[
            "job",
            "start",
            "acme/web/shop",
            "--environment",
            "production",
            "--user",
            "alice",
        ],
    );
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("cannot prepare namespace `acme-web-shop-1-production`")
            && why.contains("cluster_status_403"),
        "{why}"
    );

    let grant = env.path("grant.yaml");
    std::fs::write(
        &grant,
        "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: agentk-admin}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}
subjects: [{kind: ServiceAccount, name: agentk, namespace: gitlab-agent}]
",
    )
    .expect("grant");
    env.admin_kubectl(&["apply", "-f", grant.to_str().expect("path")]);
    let job = env.start_job("acme/web/shop", Some("production"), "alice");
    let ns = "acme-web-shop-1-production";
    let kubeconfig = std::fs::read_to_string(&job.kubeconfig).expect("kubeconfig");
    assert!(
        kubeconfig.contains(&format!("namespace: {ns}")),
        "{kubeconfig}"
    );
    let binding = env
        .api
        .object(
            "rbac.authorization.k8s.io",
            "rolebindings",
            ns,
            "gitlab-ci-environment",
        )
        .expect("binding");
    assert_eq!(binding["roleRef"]["name"], "admin");
    assert_eq!(
        binding["subjects"][0]["name"],
        "gitlab:project_env:1:production"
    );

    // The job writes in its own namespace (the context's) and nowhere else.
    let cm = env.path("cm.yaml");
    std::fs::write(
        &cm,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: built}\ndata: {a: b}\n",
    )
    .expect("cm");
    let cm = cm.to_str().expect("path");
    let own = env.kubectl(&job, AGENT, &["apply", "-f", cm]);
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    assert!(env.api.object("", "configmaps", ns, "built").is_some());
    let other = env.kubectl(&job, AGENT, &["apply", "-f", cm, "-n", "shop"]);
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("forbidden"));

    // Idempotent: a second job reuses the namespace; a changed role replaces the binding.
    let again = env.start_job("acme/web/shop", Some("production"), "bob");
    assert!(std::fs::read_to_string(&again.kubeconfig)
        .expect("kc")
        .contains(ns));
    env.set_config(
        "acme/platform/agents",
        "prod",
        &config.replace("cluster_role: admin", "cluster_role: edit"),
    );
    env.start_job("acme/web/shop", Some("production"), "carol");
    let binding = env
        .api
        .object(
            "rbac.authorization.k8s.io",
            "rolebindings",
            ns,
            "gitlab-ci-environment",
        )
        .expect("binding");
    assert_eq!(binding["roleRef"]["name"], "edit");
}
