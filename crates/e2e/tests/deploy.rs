//! The installation manifests under deploy/ parse as Kubernetes objects of known kinds:
//! real kubectl applies them with `--dry-run=client` (through kas, against the test API
//! server). Field-level schema validation is off: the test API server publishes
//! OpenAPI schemas for core kinds only.

use kas_test_support::fixture::Env;
use std::path::PathBuf;

fn workspace_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_pass_kubectl_dry_run() {
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
    for (file, kinds) in [("deploy/agentk/agentk.yaml", 5), ("deploy/kas/kas.yaml", 9)] {
        let path = workspace_file(file);
        let text = std::fs::read_to_string(&path).expect("manifest");
        assert_eq!(
            text.matches("\nkind: ").count() + usize::from(text.starts_with("kind: ")),
            kinds,
            "{file}"
        );
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
            "{file}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.matches("(dry run)").count(),
            kinds,
            "{file}: {stdout}"
        );
    }
    let dockerfile = std::fs::read_to_string(workspace_file("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("USER 65532"),
        "the image must not run as root"
    );
}
