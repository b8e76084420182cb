//! README.md's two commands stay true: the first runs kas with its embedded defaults,
//! the second is what `.ci/run` executes.

use kas_test_support::procs::bin;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md")
}

fn sh_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        match (&mut cur, line) {
            (None, "```sh") => cur = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(b.trim().to_string());
                cur = None;
            }
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn readme_starts_with_the_run_and_test_commands() {
    let blocks = sh_blocks(&readme());
    assert!(blocks.len() >= 2, "README.md needs two sh blocks first");
    let run = &blocks[0];
    assert!(
        run.contains("--bin kas") && run.ends_with("-- --data-dir ./kas-data"),
        "{run}"
    );
    assert_eq!(blocks[1], "scripts/test");
    // The test command does all the set-up a fresh machine needs, then runs everything.
    let script =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/test"))
            .expect("scripts/test");
    for needle in [
        "apt-get install",
        "chromium",
        "target/tools/bin/helm",
        "cargo build --workspace --bins",
        "cargo test --workspace",
    ] {
        assert!(script.contains(needle), "scripts/test lacks `{needle}`");
    }
    let ci = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.ci/run"))
        .expect(".ci/run");
    assert!(
        ci.contains("README.md") && ci.contains("n==2"),
        ".ci/run must run README's test command"
    );
}

#[test]
fn the_run_command_starts_kas_with_embedded_defaults() {
    // The README's arguments, in a fresh directory; listeners on free ports through
    // the environment (flags would win over it, and the README sets none).
    let dir = tempfile::tempdir().expect("tmp");
    let mut child = Command::new(bin("kas"))
        .args(["--data-dir", "./kas-data"])
        .current_dir(dir.path())
        .env("KAS_LISTEN_AGENT", "127.0.0.1:0")
        .env("KAS_LISTEN_API", "127.0.0.1:0")
        .env("KAS_LISTEN_K8S_PROXY", "127.0.0.1:0")
        .env("KAS_LISTEN_OBSERVABILITY", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kas");
    let mut api = String::new();
    let mut printed = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
    {
        if let Some(u) = line.strip_prefix("kas: listening api ") {
            api = u.to_string();
        }
        let done = line == "kas: ready";
        printed.push(line);
        if done {
            break;
        }
    }
    assert!(
        printed
            .iter()
            .any(|l| l.starts_with("kas: admin token file ./kas-data/admin-token")),
        "{printed:?}"
    );
    for name in [
        "agent grpc://",
        "k8s_proxy https://",
        "observability http://",
    ] {
        assert!(
            printed.iter().any(|l| l.contains(name)),
            "{name} missing in {printed:?}"
        );
    }
    // kasctl with its default token file works from the same directory.
    let out = Command::new(bin("kasctl"))
        .args(["--server", &api, "group", "create", "acme/platform"])
        .current_dir(dir.path())
        .output()
        .expect("kasctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(dir.path().join("kas-data/controlplane.sqlite").is_file());
    assert!(dir.path().join("kas-data/k8s-proxy-ca.crt").is_file());
}

#[test]
fn invalid_settings_are_all_reported_before_binding() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(bin("kas"))
        .args([
            "--data-dir",
            "./d",
            "--listen-agent",
            "nope",
            "--listen-api",
            "127.0.0.1:1",
            "--listen-k8s-proxy",
            "127.0.0.1:1",
            "--k8s-proxy-url",
            "ftp://x",
        ])
        .current_dir(dir.path())
        .output()
        .expect("kas");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with("kas: invalid configuration"))
            .count(),
        3,
        "{err}"
    );
    assert!(
        !dir.path().join("d").exists(),
        "nothing may be created for an invalid configuration"
    );
}

#[test]
fn agentk_reports_a_bad_setting_after_writing_its_log() {
    let dir = tempfile::tempdir().expect("tmp");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    std::fs::write(dir.path().join("t"), "agent-token").expect("token");
    std::fs::write(
        dir.path().join("kc"),
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:1\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\nusers:\n- name: u\n  user:\n    token: abc\n",
    )
    .expect("kubeconfig");
    let agentk = |token_file: &str| {
        Command::new(bin("agentk"))
            .args(["--kas-address", "grpc://127.0.0.1:1", "--token-file"])
            .arg(token_file)
            .args(["--kubeconfig", "kc", "--listen-observability"])
            .arg(addr.to_string())
            .current_dir(dir.path())
            .output()
            .expect("agentk")
    };

    let out = agentk("missing");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agentk: cannot read --token-file missing"),
        "{err}"
    );

    // The port is taken: agentk has already logged its start, and that line must not be
    // lost to the exit.
    let out = agentk("t");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let logs = format!("{}{err}", String::from_utf8_lossy(&out.stdout));
    assert!(
        err.contains(&format!(
            "agentk: cannot bind --listen-observability {addr}"
        )),
        "{err}"
    );
    assert!(logs.contains("agentk starting"), "{logs}");
}
