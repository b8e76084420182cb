//! agentk's access to its cluster through `kube`'s configuration: a kubeconfig whose
//! user is an exec credential plugin, against the test API server over TLS.

use agentk::{ClusterAccess, Upstream};
use kas_test_support::apiserver::{Options, TestApiServer, User};
use std::time::Duration;

#[tokio::test]
async fn exec_plugin_credentials_reach_the_api_server() {
    let api = TestApiServer::start_with(Options {
        tls: true,
        ..Default::default()
    })
    .await
    .expect("api server");
    let token = api.add_token(User::service_account("gitlab-agent", "agentk"));
    let dir = tempfile::tempdir().expect("dir");
    let runs = dir.path().join("runs");
    let plugin = dir.path().join("credential-plugin");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\necho run >> '{}'\nprintf '%s' '{{\"apiVersion\":\"client.authentication.k8s.io/v1beta1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{token}\"}}}}'\n",
            runs.display()
        ),
    )
    .expect("plugin");
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let exec = format!(
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: {}\n      interactiveMode: Never\n",
        plugin.display()
    );
    let kubeconfig = api
        .kubeconfig_for(&token)
        .replace(&format!("    token: {token}\n"), &exec);
    assert!(kubeconfig.contains("exec:"), "{kubeconfig}");
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, kubeconfig).expect("kubeconfig");

    let access = ClusterAccess::from_kubeconfig(&path, None)
        .await
        .expect("access");
    let upstream = Upstream::new(access).expect("upstream");
    let meta = upstream.meta(Duration::from_secs(10)).await;
    assert!(!meta.kubernetes_version.is_empty(), "{meta:?}");
    let seen = api.recorded_for("/version");
    assert_eq!(
        seen.first().map(|r| r.authenticated_as.as_str()),
        Some("system:serviceaccount:gitlab-agent:agentk")
    );
    let ran = std::fs::read_to_string(&runs).expect("the plugin ran");
    assert!(ran.lines().count() >= 1);
}
