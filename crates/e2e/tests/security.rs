//! Smaller security properties: a WebSocket client's bearer token (sent as a
//! subprotocol) authenticates it but never reaches the cluster, and kas keeps its data
//! dir private.

use kas_test_support::fixture::Env;
use kas_test_support::sockets::tls_connect;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = "ci_access:\n  projects:\n    - id: acme/web/shop\n";

/// Sends a WebSocket exec upgrade through the proxy; returns the response head.
async fn ws_exec(env: &Env, path: &str, headers: &str) -> String {
    let mut s = tls_connect(&env.proxy_ca(), &env.kas_info.k8s_proxy)
        .await
        .expect("tls");
    let req = format!(
        "GET /k8s-proxy{path} HTTP/1.1\r\nHost: kas\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).await.unwrap_or(0) == 0 {
                break;
            }
            head.push(b[0]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("response head");
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_bearer_tokens_authenticate_and_never_reach_the_cluster() {
    use base64::Engine;
    let mut env = Env::start().await;
    env.kasctl(&["project", "create", "acme/web/shop"]);
    let (agent, token) = env.create_agent("acme/platform/agents", "prod", CONFIG);
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 1);
    let job = env.start_job("acme/web/shop", None, "alice");
    let bearer = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("ci:{agent}:{}", job.token));
    let protocols = format!(
        "Sec-WebSocket-Protocol: v5.channel.k8s.io, base64url.bearer.authorization.k8s.io.{bearer}\r\n"
    );
    // The token in the subprotocol is the only credential: accepted.
    let path = "/api/v1/namespaces/default/pods/web-0/exec?command=true&stdout=true";
    let head = ws_exec(&env, path, &protocols).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("v5.channel.k8s.io"), "{head}");
    // With an Authorization header as well: the header decides, the entry still goes.
    let path2 = "/api/v1/namespaces/default/pods/web-1/exec?command=true&stdout=true";
    let with_header = format!(
        "{protocols}Authorization: Bearer ci:{agent}:{}\r\n",
        job.token
    );
    let head = ws_exec(&env, path2, &with_header).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for p in [
        "/api/v1/namespaces/default/pods/web-0/exec",
        "/api/v1/namespaces/default/pods/web-1/exec",
    ] {
        let seen = env.api.recorded_for(p);
        assert_eq!(seen.len(), 1, "{p}");
        assert_eq!(seen[0].websocket_protocols, ["v5.channel.k8s.io"], "{p}");
        let auth = seen[0].authorization.clone().unwrap_or_default();
        assert!(
            !auth.contains(&job.token),
            "the job token reached the cluster"
        );
    }
    // A wrong token in the subprotocol is refused like a wrong header.
    let bad = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("ci:{agent}:nope"));
    let head = ws_exec(
        &env,
        path,
        &format!("Sec-WebSocket-Protocol: v5.channel.k8s.io, base64url.bearer.authorization.k8s.io.{bad}\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_dir_and_every_file_in_it_are_private() {
    let mut env = Env::start().await;
    env.kasctl(&["project", "create", "acme/web/shop"]);
    let data = env.path("kas-data");
    let check = |when: &str| {
        assert_eq!(mode(&data), 0o700, "{when}: data dir");
        let names: Vec<String> = std::fs::read_dir(&data)
            .expect("read dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for n in [
            "controlplane.sqlite",
            "controlplane.sqlite-wal",
            "admin-token",
            "k8s-proxy-ca.crt",
        ] {
            assert!(
                names.iter().any(|x| x == n),
                "{when}: {n} missing in {names:?}"
            );
        }
        for n in &names {
            assert_eq!(mode(&data.join(n)), 0o600, "{when}: {n}");
        }
    };
    check("fresh");
    // An existing dir with loose permissions (an older kas, a copy) is tightened.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for e in std::fs::read_dir(&data).expect("read dir").flatten() {
        std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    env.restart_kas(false);
    env.kasctl(&["project", "create", "acme/web/other"]);
    check("restarted");
}
