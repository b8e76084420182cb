//! Real kubectl through kas and agentk against the test API server, for every
//! `access_as` mode, asserting the identity the cluster saw.

// A story reads top to bottom as a user runs it.
#![allow(clippy::too_many_lines)]

use kas_test_support::apiserver::SERVICE_ACCOUNT;
use kas_test_support::fixture::{Env, Job};
use kas_test_support::{story, Recorded};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

/// The kubectl story through `env`'s kas (see [`story::exercise`]).
fn exercise(env: &Env, job: &Job, ctx: &str, ns: &str, tag: &str) -> Vec<Recorded> {
    story::exercise(
        &story::Target {
            api: &env.api,
            kubectl: &|args| env.kubectl_cmd(job, ctx, args),
            dir: env.dir.path(),
            logs: &|| env.logs(),
        },
        ns,
        tag,
    )
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
    story::ok(
        &env.kubectl(&job, "group1/agents:ci-job", &["get", "pods"]),
        &|| env.logs(),
    );
    assert_eq!(
        story::last(&env.api, "/api/v1/namespaces/shop/pods").method,
        "GET"
    );

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
    story::ok(&out, &|| env.logs());
    let r = story::last(&env.api, "/api/v1/namespaces/kube-system/pods");
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
