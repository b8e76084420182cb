//! The installation manifests under deploy/: the plain manifests and the Helm charts
//! rendered by the real `helm` validate strictly against the Kubernetes 1.32 schemas
//! (kubernetes-validate) and pass real kubectl's `apply --dry-run=client` through kas;
//! the charts refuse settings that cannot work; and kas and agentk started exactly as
//! the rendered Deployments start them (arguments, environment, mounted config and
//! secrets, init container) come up ready and connect, on one replica with SQLite and
//! on the shared Redis and PostgreSQL with TLS.

// A story reads top to bottom as a user runs it.
#![allow(clippy::too_many_lines)]

use kas_test_support::certs::LocalhostCert;
use kas_test_support::fixture::{wait_for, Env};
use kas_test_support::http;
use kas_test_support::pods::{self, find, helm_template, objects, workspace_file, Pod};
use kas_test_support::procs::{self, KasInfo, Proc};
use kas_test_support::services::{free_port, Postgres, Redis};
use kas_test_support::TestApiServer;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const K8S_VERSION: &str = "1.32.0";

fn sets(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The agentk chart with the values it requires.
fn agentk_chart(extra: &[(&str, &str)]) -> String {
    let mut s = sets(&[
        ("kasAddress", "grpcs://kas.example.com:8150"),
        ("token", "an-agent-token"),
    ]);
    s.extend(sets(extra));
    helm_template("agentk", "prod", "gitlab-agent", &s).expect("agentk chart renders")
}

/// The kas chart for several replicas: Redis, PostgreSQL and a proxy certificate.
fn kas_ha_values(redis: &str, postgres: &str) -> Vec<(String, String)> {
    sets(&[
        ("replicaCount", "3"),
        ("redis.url", redis),
        ("controlplane.url", postgres),
        ("k8sProxy.tls.secretName", "kas-proxy-tls"),
        ("k8sProxy.url", "https://kas.example.com/k8s-proxy/"),
        ("agent.tls.secretName", "kas-agent-tls"),
        ("application.enabled", "true"),
    ])
}

fn kinds(objs: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = objs
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    k.sort();
    k
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_and_charts_validate_and_pass_kubectl_dry_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let rendered = [
        ("agentk chart", agentk_chart(&[])),
        (
            "kas chart, one replica",
            helm_template("kas", "kas", "kas", &[]).expect("kas chart renders"),
        ),
        (
            "kas chart, three replicas",
            helm_template(
                "kas",
                "kas",
                "kas",
                &kas_ha_values("redis://:pw@redis:6379/0", "postgres://kas:pw@pg:5432/kas"),
            )
            .expect("kas chart renders"),
        ),
    ];
    let mut files: Vec<(String, PathBuf)> = vec![
        (
            "deploy/agentk/agentk.yaml".into(),
            workspace_file("deploy/agentk/agentk.yaml"),
        ),
        (
            "deploy/kas/kas.yaml".into(),
            workspace_file("deploy/kas/kas.yaml"),
        ),
    ];
    for (i, (what, yaml)) in rendered.iter().enumerate() {
        let p = dir.path().join(format!("rendered-{i}.yaml"));
        std::fs::write(&p, yaml).expect("write");
        files.push((what.to_string(), p));
    }
    let read = |p: &Path| objects(&std::fs::read_to_string(p).expect("manifest"));
    let expected: [&[&str]; 5] = [
        &[
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "Deployment",
            "Namespace",
            "Secret",
            "ServiceAccount",
        ],
        &[
            "ConfigMap",
            "Deployment",
            "Namespace",
            "Secret",
            "Service",
            "Service",
            "Service",
            "Service",
            "Service",
        ],
        // Two replicas by default: a disruption budget; the impersonation role.
        &[
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Secret",
            "ServiceAccount",
        ],
        // One replica: SQLite on a volume claim, no private listener, no budget.
        &[
            "ConfigMap",
            "Deployment",
            "PersistentVolumeClaim",
            "Secret",
            "Service",
            "Service",
            "Service",
            "Service",
        ],
        // Several: no volume claim, a headless Service for the private API, a budget.
        &[
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "Service",
            "Service",
            "Service",
            "Service",
        ],
    ];
    for ((what, p), want) in files.iter().zip(expected) {
        assert_eq!(kinds(&read(p)), want, "{what}");
    }
    let one = read(&files[3].1);
    assert_eq!(
        find(&one, "Deployment", None)["spec"]["strategy"]["type"],
        "Recreate"
    );
    let three = read(&files[4].1);
    assert_eq!(find(&three, "Deployment", None)["spec"]["replicas"], 3);
    // Passwords in URLs stay out of the ConfigMap.
    let config = find(&three, "ConfigMap", None)["data"]["kas.yaml"].to_string();
    assert!(!config.contains("pw"), "{config}");

    // helm's own checks of the charts.
    for (chart, values) in [
        (
            "agentk",
            sets(&[("kasAddress", "grpcs://kas:8150"), ("token", "t")]),
        ),
        ("kas", Vec::new()),
    ] {
        if let Err(report) = pods::helm_lint(chart, &values) {
            panic!("helm lint {chart}: {report}");
        }
    }

    // Strict schema validation: unknown fields and wrong types are errors.
    let paths: Vec<&Path> = files.iter().map(|(_, p)| p.as_path()).collect();
    let report = pods::validate_schemas(&paths, K8S_VERSION).unwrap_or_else(|e| panic!("{e}"));
    let objects_total: usize = files.iter().map(|(_, p)| read(p).len()).sum();
    assert_eq!(
        report.matches(" passed for resource ").count(),
        objects_total,
        "{report}"
    );
    // ... which does catch a mistake.
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&files[2].1).expect("read").replace(
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: true\n            readOnlyRoot: true",
        ),
    )
    .expect("write");
    let err = pods::validate_schemas(&[&broken], K8S_VERSION).expect_err("an unknown field fails");
    assert!(err.contains("readOnlyRoot"), "{err}");

    // Real kubectl, through kas, against the test API server.
    let mut env = Env::start().await;
    let (agent, token) = env.create_agent(
        "acme/platform/agents",
        "prod",
        "ci_access:\n  projects:\n    - id: acme/ops/deploy\n",
    );
    env.kasctl(&["project", "create", "acme/ops/deploy"]);
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 1);
    let job = env.start_job("acme/ops/deploy", None, "ops");
    for (what, path) in &files {
        let out = env.kubectl(
            &job,
            "acme/platform/agents:prod",
            &[
                "apply",
                "--dry-run=client",
                "--validate=false",
                "-f",
                path.to_str().expect("path"),
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{what}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.matches("(dry run)").count(),
            read(path).len(),
            "{what}: {stdout}"
        );
    }
}

/// The image build cannot run here (no container engine), so check what it relies on:
/// the packages it builds exist in the workspace with `--locked`, and it installs every
/// binary the charts' containers run, as a non-root user.
#[test]
fn dockerfile_builds_the_binaries_the_charts_run() {
    let dockerfile = std::fs::read_to_string(workspace_file("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("USER 65532"),
        "the image must not run as root"
    );
    let build = dockerfile
        .lines()
        .find(|l| l.contains("cargo build"))
        .expect("a cargo build step");
    assert!(build.contains("--locked"), "{build}");
    let words: Vec<&str> = build.split_whitespace().collect();
    let packages: Vec<&str> = words
        .windows(2)
        .filter(|w| w[0] == "-p")
        .map(|w| w[1])
        .collect();
    let copied: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY --from=build"))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.strip_prefix("/src/target/release/"))
        .collect();

    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--locked",
            "--offline",
            "--no-deps",
            "--format-version",
            "1",
        ])
        .current_dir(workspace_file("."))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("metadata");
    let mut bins = Vec::new();
    for p in &packages {
        let pkg = meta["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["name"] == *p)
            .unwrap_or_else(|| panic!("the Dockerfile builds {p}, which is not in the workspace"));
        bins.extend(
            pkg["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| t["kind"][0] == "bin")
                .filter_map(|t| t["name"].as_str().map(str::to_string)),
        );
    }
    for b in &copied {
        assert!(
            bins.iter().any(|x| x == b),
            "the Dockerfile copies {b}, which it does not build ({bins:?})"
        );
    }
    for (chart, sets) in [
        (
            "agentk",
            sets(&[("kasAddress", "grpcs://kas:8150"), ("token", "t")]),
        ),
        ("kas", Vec::new()),
    ] {
        let objs = objects(&helm_template(chart, "r", "ns", &sets).expect("renders"));
        let pod = &find(&objs, "Deployment", None)["spec"]["template"]["spec"];
        for c in pod["containers"].as_array().into_iter().flatten() {
            let cmd = c["command"][0].as_str().expect("command");
            assert!(
                copied.contains(&cmd),
                "{chart} runs {cmd}, which the image lacks"
            );
        }
    }
}

/// Chart values as `--set` pairs.
type Values<'a> = &'a [(&'a str, &'a str)];

#[test]
fn charts_refuse_settings_that_cannot_work() {
    let cases: &[(&str, Values, &str)] = &[
        ("agentk", &[("token", "t")], "kasAddress is required"),
        (
            "agentk",
            &[("kasAddress", "grpcs://kas:8150")],
            "token (the agent token",
        ),
        (
            "agentk",
            &[("kasAddress", "https://kas:8150"), ("token", "t")],
            "must be grpc://host:port or grpcs://host:port",
        ),
        (
            "kas",
            &[("replicaCount", "2")],
            "replicaCount > 1 needs redis.url",
        ),
        (
            "kas",
            &[("replicaCount", "2"), ("redis.url", "redis://r:6379")],
            "replicaCount > 1 needs controlplane.url",
        ),
        (
            "kas",
            &[
                ("replicaCount", "2"),
                ("redis.url", "redis://r:6379"),
                ("controlplane.url", "postgres://p/kas"),
            ],
            "needs k8sProxy.tls.secretName",
        ),
        (
            "kas",
            &[("redis.url", "http://r:6379")],
            "redis.url must start with redis://",
        ),
        (
            "kas",
            &[("controlplane.url", "mysql://db")],
            "controlplane.url must be a postgres:// URL",
        ),
        (
            "kas",
            &[
                ("redis.url", "redis://r"),
                ("secrets.privateSecret", "too-short"),
            ],
            "secrets.privateSecret must be at least 32 bytes",
        ),
        (
            "kas",
            &[
                ("k8sProxy.plaintext", "true"),
                ("k8sProxy.tls.secretName", "t"),
            ],
            "not both",
        ),
        (
            "kas",
            &[("logFormat", "xml")],
            "logFormat must be json or text",
        ),
    ];
    for (chart, values, message) in cases {
        let err = helm_template(chart, "r", "ns", &sets(values))
            .expect_err(&format!("{chart} {values:?} must not render"));
        assert!(err.contains(message), "{chart} {values:?}: {err}");
    }
}

/// Local programs for the images' commands.
fn image_bins(program: &str) -> PathBuf {
    match program {
        "kas" | "agentk" | "kasctl" => procs::bin(program),
        other => PathBuf::from(other), // the init container's cp
    }
}

/// A CA and a certificate for `localhost` signed by it, as a kubernetes.io/tls Secret.
fn tls_secret() -> (BTreeMap<String, Vec<u8>>, String) {
    let tls = LocalhostCert::generate();
    let data = BTreeMap::from([
        ("tls.crt".to_string(), tls.cert.into_bytes()),
        ("tls.key".to_string(), tls.key.into_bytes()),
        ("ca.crt".to_string(), tls.ca.clone().into_bytes()),
    ]);
    (data, tls.ca)
}

/// Starts kas from the rendered kas chart and agentk from the rendered agentk chart;
/// checks that kas is ready, that kasctl works with the chart's admin token, and that
/// the agent connects and is ready.
async fn run_charts(mut kas_values: Vec<(String, String)>, shared: bool) {
    let dir = tempfile::tempdir().expect("tmp");
    let api = TestApiServer::start().await.expect("test API server");
    let cluster = dir.path().join("cluster.yaml");
    std::fs::write(&cluster, api.kubeconfig()).expect("write");

    let ports = [
        ("ports.agent", free_port()),
        ("ports.observability", free_port()),
        ("ports.api", free_port()),
        ("ports.k8sProxy", free_port()),
        ("ports.private", free_port()),
    ];
    kas_values.extend(ports.iter().map(|(k, p)| (k.to_string(), p.to_string())));
    let kas_objs = objects(&helm_template("kas", "kas", "kas", &kas_values).expect("kas chart"));
    let (agent_tls, agent_ca) = tls_secret();
    let (proxy_tls, _) = tls_secret();
    let kas_pod = Pod::new(
        kas_objs.clone(),
        BTreeMap::from([
            ("kas-agent-tls".to_string(), agent_tls),
            ("kas-proxy-tls".to_string(), proxy_tls),
        ]),
    );
    let (_kas, info): (Proc, KasInfo) = procs::start_kas_cmd(
        kas_pod.prepare("kas", &image_bins),
        &dir.path().join("logs"),
    );
    if shared {
        assert!(info.agent.starts_with("grpcs://"), "{}", info.agent);
        assert!(
            info.private.ends_with(&ports[4].1.to_string()),
            "{}",
            info.private
        );
    }

    // The init container put the Secret's admin token in the data dir; kasctl uses it.
    let secret = find(&kas_objs, "Secret", None);
    let admin = secret["stringData"]["admin-token"]
        .as_str()
        .expect("admin token");
    assert_eq!(
        String::from_utf8_lossy(&kas_pod.read("/var/lib/kas/admin-token")).trim(),
        admin
    );
    let c = http::client(&[], false);
    let ready = format!("http://127.0.0.1:{}/readyz", ports[1].1);
    assert_eq!(http::get(&c, &ready, None).await.0, 200);
    procs::kasctl(&info, &["project", "create", "acme/platform/agents"]);
    let created = procs::kasctl_json(&info, &["agent", "create", "acme/platform/agents", "prod"]);
    let agent_id = created["id"].as_u64().expect("id");
    let token = created["token"].as_str().expect("token");

    let scheme = if shared { "grpcs" } else { "grpc" };
    let address = format!("{scheme}://localhost:{}", ports[0].1);
    let agentk_port = free_port().to_string();
    let mut agentk_values = sets(&[
        ("kasAddress", &address),
        ("token", token),
        ("observability.port", &agentk_port),
        ("logFormat", "text"),
        // Reach kas directly, as NO_PROXY says (the proxy named would not answer), and
        // send a header kas ignores.
        ("extraEnv[0].name", "HTTPS_PROXY"),
        ("extraEnv[0].value", "http://127.0.0.1:9"),
        ("extraEnv[1].name", "HTTP_PROXY"),
        ("extraEnv[1].value", "http://127.0.0.1:9"),
        ("extraEnv[2].name", "NO_PROXY"),
        ("extraEnv[2].value", "localhost"),
        ("kasHeaders[0]", "X-Gateway-Token: abc123"),
        ("hostAliases[0].ip", "127.0.0.1"),
        ("hostAliases[0].hostnames[0]", "kas.example.com"),
    ]);
    if shared {
        agentk_values.extend(sets(&[("caCert", &agent_ca)]));
    }
    let agentk_pod = Pod::new(
        objects(
            &helm_template("agentk", "prod", "gitlab-agent", &agentk_values).expect("agentk chart"),
        ),
        BTreeMap::new(),
    );
    let mut cmd = agentk_pod.prepare("agentk", &image_bins);
    // Outside a cluster agentk needs a kubeconfig instead of its ServiceAccount.
    cmd.arg("--kubeconfig").arg(&cluster);
    let log = dir.path().join("agentk.log");
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start agentk");
    let agentk = Proc {
        child,
        stderr_path: log,
    };

    wait_for(Duration::from_secs(20), "the agent to connect", || {
        procs::kasctl_json(&info, &["agents"])
            .as_array()?
            .iter()
            .any(|a| a["id"] == agent_id && a["replicas"].as_array().is_some_and(|r| r.len() == 1))
            .then_some(())
    });
    // kas lists the agent as soon as its first acknowledgement arrives; agentk counts
    // itself connected once the configuration kas sends back is applied, a moment later.
    let agentk_ready = format!("http://127.0.0.1:{agentk_port}/readyz");
    let status = http::get_until(&c, &agentk_ready, 200, Duration::from_secs(10))
        .await
        .0;
    assert_eq!(status, 200, "{}", agentk.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn kas_and_agentk_run_as_the_charts_render_them() {
    // Connection limits pass through to kas's configuration as they are written.
    let limits = [
        ("connections.k8s_proxy.max", "500"),
        ("connections.k8s_proxy.idle_timeout", "30s"),
        ("agent.maxConnectionAge", "30m"),
    ];
    let values = limits
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    run_charts(values, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kas_runs_as_the_chart_renders_it_for_several_replicas() {
    let redis = Redis::start();
    let postgres = Postgres::start();
    run_charts(kas_ha_values(&redis.url(), &postgres.url()), true).await;
}
