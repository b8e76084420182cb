//! Agent configurations written for GitLab work as they are: the examples of the seed
//! documents and of GitLab's documentation (in `tests/data/configs`, unchanged) are
//! stored with warnings naming what kas ignores, and jobs run through them with the
//! access they describe; the extras of GitLab's `impersonate.extra` form reach the
//! cluster exactly; `observability.logging` changes agentk's log level at runtime; the
//! `ci_access` limit is a kas setting.

// A story reads top to bottom as a user runs it.
#![allow(clippy::too_many_lines)]

use kas_test_support::fixture::{wait_for, Env};
use std::path::PathBuf;
use std::time::Duration;

const AGENT_PROJECT: &str = "path/to/agent/repository";
const CONTEXT: &str = "path/to/agent/repository:agent-name";

fn data(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/configs")).join(name)
}

/// kas with the projects and environments the examples name, and the agent connected.
async fn setup(kas_yaml: &str) -> (Env, u64) {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("kas.yaml");
    std::fs::write(&cfg, kas_yaml).expect("config");
    let mut env = Env::start_with(&["--config", cfg.to_str().expect("path")]).await;
    for p in [
        "path/to/project",
        "path/to/project-1",
        "path/to/project-2",
        "path/to/group/subgroup/app",
        "path/to/group-1/app",
        "path/to/other",
    ] {
        env.kasctl(&["project", "create", p]);
    }
    for (p, e, tier) in [
        ("path/to/project-2", "staging", "staging"),
        ("path/to/project-2", "review/app-1", "development"),
        ("path/to/project-2", "production", "production"),
        ("path/to/group-1/app", "production", "production"),
        ("path/to/group-1/app", "staging", "staging"),
    ] {
        env.kasctl(&["environment", "create", p, e, "--tier", tier]);
    }
    let (agent, token) = env.create_agent(AGENT_PROJECT, "agent-name", "");
    env.start_agentk(&token, &[]);
    env.wait_connected(agent, 1);
    (env, agent)
}

/// Stores `file` as the agent's configuration with kasctl; returns its warnings.
fn set_config(env: &Env, file: &str) -> String {
    let out = kas_test_support::procs::kasctl_raw(
        &env.kas_info,
        &[
            "agent",
            "config",
            "set",
            AGENT_PROJECT,
            "agent-name",
            data(file).to_str().expect("path"),
        ],
    );
    assert!(
        out.status.success(),
        "{file} refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A job of `project` (in `environment`, on a protected ref or not): the proxy's
/// answer to a request through the agent.
async fn job_status(
    env: &Env,
    agent: u64,
    project: &str,
    environment: Option<&str>,
    protected: bool,
) -> u16 {
    let mut args = vec!["job", "start", project, "--user", "alice"];
    if let Some(e) = environment {
        args.extend(["--environment", e]);
    }
    if protected {
        args.push("--protected");
    }
    let job = env.kasctl_json(&args);
    let token = job["token"].as_str().expect("token");
    let c = kas_test_support::http::client(&env.proxy_ca(), false);
    let url = format!("{}/api/v1/namespaces/default/pods", env.proxy_url());
    let (code, body) =
        kas_test_support::http::get(&c, &url, Some(&format!("ci:{agent}:{token}"))).await;
    assert!(code == 200 || code == 403, "{code}: {body}");
    code
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_and_gitlab_example_configurations_work_unchanged() {
    let (env, agent) = setup("").await;
    // (file, [(project, environment, protected ref, allowed)])
    type Case<'a> = (&'a str, Option<&'a str>, bool, bool);
    let examples: [(&str, &[Case]); 6] = [
        (
            "seed-projects.yaml",
            &[
                ("path/to/project", None, false, true),
                ("path/to/other", None, false, false),
            ],
        ),
        (
            "seed-groups.yaml",
            &[
                ("path/to/group/subgroup/app", None, false, true),
                ("path/to/project", None, false, false),
            ],
        ),
        (
            "seed-ci-job.yaml",
            &[("path/to/project", None, false, true)],
        ),
        (
            "seed-environments.yaml",
            &[
                ("path/to/project-1", None, false, true),
                ("path/to/project-2", Some("staging"), false, true),
                ("path/to/project-2", Some("review/app-1"), false, true),
                ("path/to/project-2", Some("production"), false, false),
                ("path/to/project-2", None, false, false),
                ("path/to/group-1/app", Some("production"), false, true),
                ("path/to/group-1/app", Some("staging"), false, false),
            ],
        ),
        (
            "gitlab-protected-branches.yaml",
            &[
                ("path/to/project-1", None, false, false),
                ("path/to/project-1", None, true, true),
                ("path/to/group-1/app", Some("production"), true, true),
                ("path/to/group-1/app", Some("production"), false, false),
            ],
        ),
        (
            "gitlab-full.yaml",
            &[
                ("path/to/project", None, false, true),
                ("path/to/project-1", None, false, false),
            ],
        ),
    ];
    for (file, cases) in examples {
        set_config(&env, file);
        for (project, environment, protected, allowed) in cases {
            let code = job_status(&env, agent, project, *environment, *protected).await;
            assert_eq!(
                code == 200,
                *allowed,
                "{file}: {project} {environment:?} protected={protected} got {code}"
            );
        }
    }
    // The full GitLab file: what kas ignores is named, in kasctl's output and kas's log.
    let warnings = set_config(&env, "gitlab-full.yaml");
    for section in [
        "gitops",
        "user_access",
        "container_scanning",
        "remote_development",
        "flux",
    ] {
        assert!(
            warnings.contains(&format!("warning: {section}:")),
            "no warning for {section}: {warnings}"
        );
    }
    assert!(env
        .kas
        .logs()
        .contains("agent configuration stored with a warning"));
    // And a real kubectl job through it, as the CI/CD workflow describes.
    let job = env.start_job("path/to/project", None, "alice");
    let out = env.kubectl(&job, CONTEXT, &["get", "pods"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = env.api.recorded_for("/api/v1/namespaces/default/pods");
    let last = seen.last().expect("recorded");
    assert_eq!(
        last.impersonate_user.as_deref(),
        Some(format!("gitlab:ci_job:{}", job.id).as_str())
    );

    // Misspelt keys in the sections kas implements are still refused, with the path.
    let bad = env.path("bad.yaml");
    std::fs::write(&bad, "ci_access:\n  project:\n    - id: path/to/project\n").expect("write");
    let out = kas_test_support::procs::kasctl_raw(
        &env.kas_info,
        &[
            "agent",
            "config",
            "set",
            AGENT_PROJECT,
            "agent-name",
            bad.to_str().expect("path"),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ci_access.project"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn impersonate_extra_in_gitlab_form_reaches_the_cluster_exactly() {
    let (env, agent) = setup("").await;
    set_config(&env, "gitlab-impersonate-extra.yaml");
    assert_eq!(
        job_status(&env, agent, "path/to/project", None, false).await,
        200
    );
    let seen = env.api.recorded_for("/api/v1/namespaces/default/pods");
    let r = seen.last().expect("recorded");
    assert_eq!(r.impersonate_user.as_deref(), Some("deployer"));
    assert_eq!(r.impersonate_uid.as_deref(), Some("1234"));
    assert_eq!(r.impersonate_groups, ["deployers", "system:authenticated"]);
    let extra: Vec<(&str, Vec<&str>)> = r
        .impersonate_extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.iter().map(String::as_str).collect()))
        .collect();
    assert_eq!(
        extra,
        [
            ("example.com/reason", vec!["deploy"]),
            ("team", vec!["web", "ops"])
        ]
    );
}

/// The replica's acknowledged configuration version, once it is `version`.
fn wait_applied(env: &Env, agent: u64, version: u64) {
    wait_for(Duration::from_secs(10), "the configuration applied", || {
        let a = env.connected(agent)?;
        (a["replicas"][0]["config_version"].as_u64() == Some(version)).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn observability_logging_changes_agentk_log_level_at_runtime() {
    let (env, agent) = setup("").await;
    let version = |yaml: &str| env.set_config(AGENT_PROJECT, "agent-name", yaml);
    let access = "ci_access:\n  projects:\n    - id: path/to/project\n";
    // Debug: agentk logs each request it serves.
    let v = version(&format!(
        "{access}observability:\n  logging:\n    level: debug\n"
    ));
    wait_applied(&env, agent, v);
    assert_eq!(
        job_status(&env, agent, "path/to/project", None, false).await,
        200
    );
    wait_for(Duration::from_secs(5), "a debug line from agentk", || {
        env.agents[0]
            .logs()
            .contains("serving a request")
            .then_some(())
    });
    // Error: the next configuration is applied without a line.
    let v = version(&format!(
        "{access}observability:\n  logging:\n    level: error\n"
    ));
    wait_applied(&env, agent, v);
    let before = env.agents[0]
        .logs()
        .matches("applied agent configuration")
        .count();
    let v = version(&format!(
        "{access}observability:\n  logging:\n    level: error\n    grpc_level: error\n"
    ));
    wait_applied(&env, agent, v);
    assert_eq!(
        env.agents[0]
            .logs()
            .matches("applied agent configuration")
            .count(),
        before,
        "agentk still logs at info"
    );
    // Without observability, agentk goes back to the level it started with.
    let v = version(access);
    wait_applied(&env, agent, v);
    let v = version(&format!("{access}# touched\n"));
    wait_applied(&env, agent, v);
    wait_for(Duration::from_secs(5), "info lines again", || {
        (env.agents[0]
            .logs()
            .matches("applied agent configuration")
            .count()
            > before)
            .then_some(())
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ci_access_limit_is_a_kas_setting() {
    let many = |n: usize| {
        let mut y = String::from("ci_access:\n  projects:\n");
        for i in 0..n {
            y.push_str(&format!("    - id: path/to/p{i}\n"));
        }
        y
    };
    let (env, _) = setup("").await;
    let f = env.path("many.yaml");
    std::fs::write(&f, many(150)).expect("write");
    let args = [
        "agent",
        "config",
        "set",
        AGENT_PROJECT,
        "agent-name",
        f.to_str().expect("path"),
    ];
    let out = kas_test_support::procs::kasctl_raw(&env.kas_info, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("at most 100 projects"),
        "{err}"
    );
    let (env, _) = setup("agent:\n  max_ci_access_projects: 500\n").await;
    let f = env.path("many.yaml");
    std::fs::write(&f, many(150)).expect("write");
    let args = [
        "agent",
        "config",
        "set",
        AGENT_PROJECT,
        "agent-name",
        f.to_str().expect("path"),
    ];
    env.kasctl(&args);
}
