//! An agent's `config.yaml`: parsing and validation, then a decision for a job, which
//! any configuration that validates must support.
#![no_main]

use kas_authz::{decide, AgentRef, Environment, JobContext, Named};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((config, _warnings)) = kas_authz::parse_agent_config(yaml, "acme/platform/agents")
    else {
        return;
    };
    assert!(config.ci_access.projects.len() <= kas_authz::MAX_PROJECTS);
    assert!(config.ci_access.groups.len() <= kas_authz::MAX_GROUPS);
    let agent = AgentRef {
        id: 1,
        name: "prod".into(),
        config_project: Named {
            id: 10,
            path: "acme/platform/agents".into(),
        },
    };
    for (project, env) in [
        ("acme/web/shop", Some("review/x")),
        ("acme/platform/agents", None),
    ] {
        let job = JobContext {
            job_id: 7,
            pipeline_id: 3,
            project: Named {
                id: 150,
                path: project.into(),
            },
            groups: vec![
                Named {
                    id: 23,
                    path: "acme".into(),
                },
                Named {
                    id: 25,
                    path: project
                        .rsplit_once('/')
                        .map(|(g, _)| g)
                        .unwrap_or("acme")
                        .into(),
                },
            ],
            environment: env.map(|e| Environment {
                name: e.into(),
                slug: "review-x".into(),
                tier: "development".into(),
            }),
            username: "alice".into(),
            protected_ref: project.len() % 2 == 0,
        };
        let _ = decide(&agent, &config, &job);
    }
    let services = config.allowed_services();
    // Validation refuses invalid service URLs: every entry parses.
    assert_eq!(services.len(), config.service_access.len());
    for s in &services {
        let _ = kas_tunnel::agent::service_allowed(
            std::slice::from_ref(s),
            "http",
            "prometheus.monitoring.svc",
            9090,
            "/api/v1/query",
        );
    }
});
