//! Real kubectl through kas and agentk against the test API server, for every
//! `access_as` mode, asserting the identity the cluster saw.

use kas_test_support::apiserver::SERVICE_ACCOUNT;
use kas_test_support::fixture::{wait_for, Env, Job};
use kas_test_support::Recorded;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

fn ok(out: &std::process::Output, env: &Env) -> String {
    assert!(
        out.status.success(),
        "kubectl failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The last request the cluster saw for `path`.
fn last(env: &Env, path: &str) -> Recorded {
    env.api
        .recorded()
        .into_iter()
        .rev()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("the cluster saw no request for {path}"))
}

/// get pods, apply -f a ConfigMap, get pods --watch receiving an event, exec echoing
/// stdin; returns what the cluster recorded for each.
fn exercise(env: &Env, job: &Job, ctx: &str, ns: &str, tag: &str) -> Vec<Recorded> {
    let mut seen = Vec::new();
    // get pods (the context's namespace comes from default_namespace)
    let out = ok(&env.kubectl(job, ctx, &["get", "pods", "-n", ns]), env);
    assert!(out.contains("NAME"), "{out}");
    seen.push(last(env, &format!("/api/v1/namespaces/{ns}/pods")));

    // apply -f of a ConfigMap
    let cm = env.path(&format!("cm-{tag}.yaml"));
    std::fs::write(&cm, format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{tag}\n  namespace: {ns}\ndata:\n  color: blue\n")).expect("write");
    let out = ok(
        &env.kubectl(job, ctx, &["apply", "-f", cm.to_str().expect("path")]),
        env,
    );
    assert!(
        out.contains(&format!("configmap/cm-{tag} created")),
        "{out}"
    );
    seen.push(last(env, &format!("/api/v1/namespaces/{ns}/configmaps")));
    let out = ok(
        &env.kubectl(
            job,
            ctx,
            &[
                "get",
                "configmap",
                &format!("cm-{tag}"),
                "-n",
                ns,
                "-o",
                "jsonpath={.data.color}",
            ],
        ),
        env,
    );
    assert_eq!(out, "blue");

    // get pods --watch receives the event of a pod created meanwhile
    let watches = || {
        env.api
            .recorded()
            .iter()
            .filter(|r| {
                r.path == format!("/api/v1/namespaces/{ns}/pods") && r.query.contains("watch=true")
            })
            .count()
    };
    let before = watches();
    let mut child = env
        .kubectl_cmd(job, ctx, &["get", "pods", "-n", ns, "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl watch");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let header = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("watch printed the list");
    assert!(header.contains("NAME"), "{header}");
    // The list is printed; the watch request follows it. Create the pod once the
    // cluster has seen the watch request, so the event cannot be missed.
    wait_for(Duration::from_secs(20), "the watch request", || {
        (watches() > before).then_some(())
    });
    let pod = format!("watched-{tag}");
    env.api.create_pod(ns, &pod);
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no watch event for {pod}\n{}", env.logs()));
        if line.contains(&pod) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    seen.push(
        env.api
            .recorded()
            .into_iter()
            .rev()
            .find(|r| {
                r.path == format!("/api/v1/namespaces/{ns}/pods") && r.query.contains("watch=true")
            })
            .expect("watch request recorded"),
    );

    // exec echoing input
    let pod = if ns == "shop" { "cart-0" } else { "web-0" };
    let mut child = env
        .kubectl_cmd(job, ctx, &["exec", "-i", "-n", ns, pod, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl exec");
    let input = format!("hello through the tunnel {tag}\n");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("exec output");
    assert!(
        out.status.success(),
        "exec failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.logs()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), input);
    seen.push(last(
        env,
        &format!("/api/v1/namespaces/{ns}/pods/{pod}/exec"),
    ));
    seen
}

fn extra(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_through_kas_for_every_access_as_mode() {
    let mut env = Env::start().await;
    // The seed's example hierarchy and ids: group1 (23) / group1-1 (25) / project1 (150).
    env.kasctl(&["group", "create", "group1", "--id", "23"]);
    env.kasctl(&["group", "create", "group1/group1-1", "--id", "25"]);
    env.kasctl(&[
        "project",
        "create",
        "group1/group1-1/project1",
        "--id",
        "150",
    ]);
    env.kasctl(&[
        "environment",
        "create",
        "group1/group1-1/project1",
        "prod",
        "--tier",
        "production",
    ]);

    let (ci_job_agent, t1) = env.create_agent(
        "group1/agents",
        "ci-job",
        "ci_access:\n  projects:\n    - id: group1/group1-1/project1\n      default_namespace: shop\n      access_as:\n        ci_job: {}\n",
    );
    let (as_agent, t2) = env.create_agent(
        "group1/agents",
        "plain",
        "ci_access:\n  groups:\n    - id: group1\n",
    );
    let (static_agent, t3) = env.create_agent(
        "group1/agents",
        "static",
        "ci_access:\n  groups:\n    - id: group1/group1-1\n      access_as:\n        impersonate:\n          username: deployer\n          uid: \"42\"\n          groups: [deployers, ops]\n          extra:\n            team: [web]\n            example.com/scope: [a, b]\n",
    );
    for t in [&t1, &t2, &t3] {
        env.start_agentk(t, &[]);
    }
    for id in [ci_job_agent, as_agent, static_agent] {
        env.wait_connected(id, 1);
    }
    let job = env.start_job("group1/group1-1/project1", Some("prod"), "alice");
    let kc = std::fs::read_to_string(&job.kubeconfig).expect("kubeconfig");
    for ctx in [
        "group1/agents:ci-job",
        "group1/agents:plain",
        "group1/agents:static",
    ] {
        assert!(
            kc.contains(&format!("name: {ctx}")),
            "context {ctx} missing:\n{kc}"
        );
    }
    assert!(
        !kc.contains("current-context"),
        "no context must be selected:\n{kc}"
    );
    assert!(
        kc.contains("namespace: shop"),
        "default_namespace missing:\n{kc}"
    );

    // access_as: ci_job, the seed's exact identity.
    let seen = exercise(&env, &job, "group1/agents:ci-job", "shop", "cijob");
    let job_id = job.id.to_string();
    let pipeline =
        env.kasctl_json(&["job", "list"]).as_array().expect("jobs")[0]["pipeline_id"].to_string();
    // `kasctl access explain` names exactly the identity the cluster saw.
    let explained = env.kasctl_json(&[
        "access",
        "explain",
        "--project",
        "group1/group1-1/project1",
        "--environment",
        "prod",
        "--agent",
        "group1/agents:ci-job",
        "--user",
        "alice",
        "--job-id",
        &job_id,
        "--pipeline-id",
        &pipeline,
    ]);
    let id = &explained["identity"];
    assert_eq!(explained["access_as"], "ci_job", "{explained}");
    assert_eq!(
        id["username"].as_str(),
        seen[0].impersonate_user.as_deref(),
        "{explained}"
    );
    let groups: Vec<&str> = id["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g.as_str())
        .collect();
    assert_eq!(groups, seen[0].impersonate_groups, "{explained}");
    let explained_extra: BTreeMap<String, Vec<String>> =
        serde_json::from_value(id["extra"].clone()).expect("extra");
    assert_eq!(explained_extra, seen[0].impersonate_extra, "{explained}");
    for r in &seen {
        assert_eq!(r.authenticated_as, SERVICE_ACCOUNT, "{r:?}");
        assert_eq!(
            r.impersonate_user.as_deref(),
            Some(format!("gitlab:ci_job:{job_id}").as_str())
        );
        assert_eq!(
            r.impersonate_groups,
            [
                "gitlab:ci_job",
                "gitlab:group:23",
                "gitlab:group_env_tier:23:production",
                "gitlab:group:25",
                "gitlab:group_env_tier:25:production",
                "gitlab:project:150",
                "gitlab:project_env:150:prod",
                "gitlab:project_env_tier:150:production"
            ]
        );
        assert_eq!(
            r.impersonate_extra,
            extra(&[
                ("agent.gitlab.com/id", &ci_job_agent.to_string()),
                (
                    "agent.gitlab.com/config_project_id",
                    &env.kasctl_json(&["agent", "list"])[0]["project_id"].to_string()
                ),
                ("agent.gitlab.com/project_id", "150"),
                ("agent.gitlab.com/ci_pipeline_id", &pipeline),
                ("agent.gitlab.com/ci_job_id", &job_id),
                ("agent.gitlab.com/username", "alice"),
                ("agent.gitlab.com/environment_slug", "prod"),
                ("agent.gitlab.com/environment_tier", "production"),
            ])
        );
    }
    // The default namespace applies without -n.
    ok(
        &env.kubectl(&job, "group1/agents:ci-job", &["get", "pods"]),
        &env,
    );
    assert_eq!(last(&env, "/api/v1/namespaces/shop/pods").method, "GET");

    // access_as: agent (default): no impersonation at all.
    for r in exercise(&env, &job, "group1/agents:plain", "default", "plain") {
        assert_eq!(r.authenticated_as, SERVICE_ACCOUNT);
        assert_eq!(
            (
                r.impersonate_user.as_ref(),
                r.impersonate_groups.len(),
                r.impersonate_extra.len()
            ),
            (None, 0, 0),
            "{r:?}"
        );
    }

    // access_as: impersonate, a static identity.
    for r in exercise(&env, &job, "group1/agents:static", "default", "static") {
        assert_eq!(r.authenticated_as, SERVICE_ACCOUNT);
        assert_eq!(r.impersonate_user.as_deref(), Some("deployer"));
        assert_eq!(r.impersonate_uid.as_deref(), Some("42"));
        assert_eq!(r.impersonate_groups, ["deployers", "ops"]);
        let mut want = extra(&[("team", "web")]);
        want.insert("example.com/scope".into(), vec!["a".into(), "b".into()]);
        assert_eq!(r.impersonate_extra, want);
    }

    // A client's own impersonation and credentials never reach the cluster.
    let out = env.kubectl(
        &job,
        "group1/agents:plain",
        &[
            "get",
            "pods",
            "-n",
            "kube-system",
            "--as",
            "system:admin",
            "--as-group",
            "system:masters",
        ],
    );
    ok(&out, &env);
    let r = last(&env, "/api/v1/namespaces/kube-system/pods");
    assert_eq!((r.impersonate_user, r.impersonate_groups.len()), (None, 0));
    assert_eq!(r.authenticated_as, SERVICE_ACCOUNT);

    // logs -f streams until the client goes away.
    let mut child = env
        .kubectl_cmd(
            &job,
            "group1/agents:plain",
            &["logs", "-f", "-n", "shop", "cart-0"],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("kubectl logs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    for i in 1..=3 {
        let l = lines.next().expect("a log line").expect("utf8");
        assert_eq!(l, format!("cart-0: line {i}"));
    }
    let _ = child.kill();
    let _ = child.wait();

    // Finishing the job revokes its token at once.
    env.kasctl(&["job", "finish", &job_id]);
    let out = env.kubectl(&job, "group1/agents:plain", &["get", "pods"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("You must be logged in to the server") || err.contains("Unauthorized"),
        "{err}"
    );
}
