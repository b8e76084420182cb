//! The kubectl verbs that stream, through kas and agentk, over both transports kubectl
//! 1.32 speaks: WebSocket (its default) and SPDY/3.1 (its fallback, forced here with
//! `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false` and `KUBECTL_PORT_FORWARD_WEBSOCKETS=false`).
//! `exec` with stdin and with a failing command, `attach`, `cp` both ways (a file and a
//! directory), and `port-forward` carrying 1 MiB each way. Also the verbs that wait on
//! the cluster: `apply --server-side`, `rollout status`, `wait --for=condition=Ready`.

// A story reads top to bottom as a user runs it.
#![allow(clippy::too_many_lines)]

use kas_test_support::fixture::{Env, Job};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

const CONFIG: &str = "ci_access:\n  projects:\n    - id: acme/web/shop\n";
const CTX: &str = "acme/platform/agents:prod";

async fn setup() -> (Env, Job) {
    let mut env = Env::start().await;
    env.kasctl(&["project", "create", "acme/web/shop"]);
    let (agent, token) = env.create_agent("acme/platform/agents", "prod", CONFIG);
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 1);
    let job = env.start_job("acme/web/shop", None, "alice");
    (env, job)
}

/// kubectl on the job's kubeconfig, on the chosen transport.
fn kubectl(env: &Env, job: &Job, spdy: bool, args: &[&str]) -> Command {
    let mut c = env.kubectl_cmd(job, CTX, args);
    if spdy {
        c.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false");
    }
    c
}

fn run_with_stdin(mut c: Command, input: &[u8]) -> Output {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    child.wait_with_output().expect("kubectl output")
}

fn ok(out: &Output, what: &str, env: &Env) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub")).expect("mkdir");
    std::fs::write(root.join("a.txt"), "first file\n").expect("write");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("sub/b.bin"), big).expect("write");
}

/// Every streaming verb on one transport; asserts that every `exec`, `attach` and
/// `portforward` reached the cluster as an `upgrade` upgrade.
fn streaming_verbs(env: &Env, job: &Job, spdy: bool, upgrade: &str) {
    // exec with stdin
    let out = run_with_stdin(
        kubectl(
            env,
            job,
            spdy,
            &["exec", "-i", "-n", "default", "web-0", "--", "cat"],
        ),
        b"line one\nline two\n",
    );
    assert_eq!(ok(&out, "exec -i", env), "line one\nline two\n");

    // a failing command: kubectl reports the exit code and exits with it
    let out = kubectl(
        env,
        job,
        spdy,
        &["exec", "-n", "default", "web-0", "--", "false"],
    )
    .output()
    .expect("kubectl");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("command terminated with exit code 1"), "{err}");

    // attach (the test pod's main process copies stdin to stdout)
    let out = run_with_stdin(
        kubectl(env, job, spdy, &["attach", "-i", "-n", "default", "web-1"]),
        b"attached\n",
    );
    assert!(ok(&out, "attach", env).contains("attached\n"), "{out:?}");

    // cp: a file up and back, a directory up and back
    let dir = tempfile::tempdir().expect("temp dir");
    write_tree(&dir.path().join("tree"));
    let cp = |args: &[&str]| {
        let out = kubectl(env, job, spdy, &[&["cp"], args].concat())
            .current_dir(dir.path())
            .output()
            .expect("kubectl cp");
        ok(&out, &format!("cp {args:?}"), env);
    };
    cp(&["tree/a.txt", "default/web-0:/tmp/a.txt"]);
    let out = kubectl(
        env,
        job,
        spdy,
        &["exec", "-n", "default", "web-0", "--", "cat", "/tmp/a.txt"],
    )
    .output()
    .expect("kubectl");
    assert_eq!(ok(&out, "cat", env), "first file\n");
    cp(&["default/web-0:/tmp/a.txt", "back.txt"]);
    assert_eq!(
        std::fs::read(dir.path().join("back.txt")).expect("read"),
        b"first file\n"
    );
    cp(&["tree", "default/web-0:/tmp/tree"]);
    cp(&["default/web-0:/tmp/tree", "tree-back"]);
    for f in ["a.txt", "sub/b.bin"] {
        assert_eq!(
            std::fs::read(dir.path().join("tree").join(f)).expect("read"),
            std::fs::read(dir.path().join("tree-back").join(f)).expect("read back"),
            "{f} changed on the round trip"
        );
    }

    // port-forward: 1 MiB each way through a forwarded port (the pod echoes)
    let mut pf = kubectl(
        env,
        job,
        spdy,
        &["port-forward", "-n", "default", "pod/web-0", ":8080"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("kubectl port-forward");
    let mut lines = BufReader::new(pf.stdout.take().expect("stdout")).lines();
    let local = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = pf.kill();
            let mut err = String::new();
            let _ = pf.stderr.take().expect("stderr").read_to_string(&mut err);
            panic!("port-forward ended: {err}\n{}", env.logs());
        };
        // "Forwarding from 127.0.0.1:40123 -> 8080"
        if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
            break rest
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
                .expect("local port");
        }
    };
    let payload: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    for _ in 0..2 {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", local)).expect("connect");
        let mut reader = conn.try_clone().expect("clone");
        let expected = payload.len();
        let read = std::thread::spawn(move || {
            let mut got = vec![0u8; expected];
            reader.read_exact(&mut got).map(|_| got)
        });
        conn.write_all(&payload).expect("send through the forward");
        let got = read.join().expect("reader").expect("read the echo");
        assert!(got == payload, "the echo differs from what was sent");
    }
    let _ = pf.kill();
    let _ = pf.wait();

    let streamed: Vec<_> = env
        .api
        .recorded()
        .into_iter()
        .filter(|r| {
            ["/exec", "/attach", "/portforward"]
                .iter()
                .any(|s| r.path.ends_with(s))
        })
        .collect();
    assert!(streamed.len() >= 8, "{streamed:?}");
    for r in streamed {
        let seen = r.upgrade.as_deref().unwrap_or_default();
        assert!(seen.eq_ignore_ascii_case(upgrade), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_verbs_over_websocket() {
    let (env, job) = setup().await;
    streaming_verbs(&env, &job, false, "websocket");
    let forward = env
        .api
        .recorded()
        .into_iter()
        .find(|r| r.path.ends_with("/portforward"))
        .expect("port-forward recorded");
    assert_eq!(
        forward.websocket_protocols,
        ["SPDY/3.1+portforward.k8s.io"],
        "{forward:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_verbs_over_spdy() {
    let (env, job) = setup().await;
    streaming_verbs(&env, &job, true, "SPDY/3.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_server_side_rollout_status_and_wait() {
    let (env, job) = setup().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = dir.path().join("app.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: api\n  namespace: default\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {app: api}\n  template:\n    metadata:\n      labels: {app: api}\n    spec:\n      containers:\n        - name: api\n          image: registry.example/api:1\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: worker\n  namespace: default\n  annotations:\n    test.kas.dev/phases: Pending@0,Running@300\nspec:\n  containers:\n    - name: w\n      image: registry.example/w:1\n",
    )
    .expect("write");
    let path = manifest.to_str().expect("path");
    let run = |args: &[&str]| {
        let out = env.kubectl(&job, CTX, args);
        ok(&out, &format!("{args:?}"), &env)
    };
    let apply = [
        "apply",
        "--server-side",
        "--field-manager",
        "ci",
        "-f",
        path,
    ];
    let out = run(&apply);
    assert!(
        out.contains("deployment.apps/api serverside-applied"),
        "{out}"
    );
    assert!(out.contains("pod/worker serverside-applied"), "{out}");
    // The same apply again changes nothing and still succeeds.
    run(&apply);
    let out = run(&[
        "rollout",
        "status",
        "-n",
        "default",
        "deployment/api",
        "--timeout=20s",
    ]);
    assert!(out.contains("successfully rolled out"), "{out}");
    let out = run(&[
        "wait",
        "-n",
        "default",
        "--for=condition=Ready",
        "pod/worker",
        "--timeout=20s",
    ]);
    assert!(out.contains("pod/worker condition met"), "{out}");
    let seen = env
        .api
        .recorded_for("/apis/apps/v1/namespaces/default/deployments/api");
    assert!(
        seen.iter()
            .any(|r| r.method == "PATCH" && r.query.contains("fieldManager=ci")),
        "{seen:?}"
    );
}
