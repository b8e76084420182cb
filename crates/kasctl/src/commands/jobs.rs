//! `kasctl environment ...` and `kasctl job ...`.

use crate::cli::{EnvCmd, JobCmd, StartArgs};
use crate::client::AdminClient;
use crate::output::{table, write_private, Out};
use anyhow::Result;
use kas_api::admin::{CreateEnvironment, EnvironmentQuery, FinishJob, StartJob};

pub async fn environment(api: &AdminClient, cmd: EnvCmd, out: Out) -> Result<()> {
    match cmd {
        EnvCmd::Create {
            project,
            name,
            tier,
        } => {
            let r = CreateEnvironment {
                project,
                name,
                tier,
            };
            let e = api.create_environment(&r).await?;
            out.show(&e, |e| {
                println!(
                    "environment {} of {} (slug {}, tier {})",
                    e.name, e.project_path, e.slug, e.tier
                )
            })
        }
        EnvCmd::List { project } => {
            let list = api.environments(&EnvironmentQuery { project }).await?;
            out.show(&list, |list| {
                table(
                    &["ID", "PROJECT", "NAME", "SLUG", "TIER"],
                    list.iter()
                        .map(|e| {
                            vec![
                                e.id.to_string(),
                                e.project_path.clone(),
                                e.name.clone(),
                                e.slug.clone(),
                                e.tier.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
    }
}

pub async fn job(api: &AdminClient, cmd: JobCmd, out: Out) -> Result<()> {
    match cmd {
        JobCmd::Start(a) => start(api, a, out).await,
        JobCmd::Finish { id, status } => {
            let j = api
                .finish_job(
                    id,
                    &FinishJob {
                        status: Some(status),
                    },
                )
                .await?;
            out.show(&j, |j| {
                println!("job {} finished ({})", j.id, j.status.as_str())
            })
        }
        JobCmd::List => out.show(&api.jobs().await?, |list| {
            table(
                &["ID", "PROJECT", "PIPELINE", "ENVIRONMENT", "USER", "STATUS"],
                list.iter()
                    .map(|j| {
                        vec![
                            j.id.to_string(),
                            j.project_path.clone(),
                            j.pipeline_id.to_string(),
                            j.environment.clone().unwrap_or_default(),
                            j.username.clone(),
                            j.status.as_str().to_string(),
                        ]
                    })
                    .collect(),
            )
        }),
    }
}

async fn start(api: &AdminClient, a: StartArgs, out: Out) -> Result<()> {
    let r = StartJob {
        project: a.project,
        environment: a.environment,
        user: a.user,
        pipeline_id: a.pipeline,
        protected: a.protected,
    };
    let started = api.start_job(&r).await?;
    if let Some(f) = &a.kubeconfig {
        write_private(f, &started.kubeconfig)?;
    }
    let j = &started.job;
    let mut summary = serde_json::json!({
        "id": j.id, "pipeline_id": j.pipeline_id, "project": j.project_path,
        "environment": j.environment, "user": j.username, "token": started.token,
        "contexts": started.contexts,
    });
    if let Some(f) = &a.kubeconfig {
        summary["kubeconfig"] = serde_json::json!(f.display().to_string());
    }
    out.show(&summary, |_| {
        println!(
            "job {} started (pipeline {}) in {}",
            j.id, j.pipeline_id, j.project_path
        );
        if started.contexts.is_empty() {
            println!("no agent authorizes this job; its kubeconfig has no contexts");
        }
        for c in &started.contexts {
            println!("context: {c}");
        }
        match &a.kubeconfig {
            Some(f) => println!("kubeconfig written to {}", f.display()),
            None => println!("job token (shown once): {}", started.token),
        }
    })
}
