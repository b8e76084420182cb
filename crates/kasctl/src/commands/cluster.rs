//! `kasctl cluster app ...`: managed applications.

use crate::cli::{AppChange, AppCmd, ClusterCmd};
use crate::client::AdminClient;
use crate::output::{table, Out};
use anyhow::{Context, Result};
use kas_api::admin::{AppRequest, AppsQuery};
use kas_api::{AppOperation, ClusterApp};

pub async fn cluster(api: &AdminClient, cmd: ClusterCmd, out: Out) -> Result<()> {
    let ClusterCmd::App(cmd) = cmd;
    match cmd {
        AppCmd::Install(c) => change(api, AppOperation::Install, c, out).await,
        AppCmd::Upgrade(c) => change(api, AppOperation::Upgrade, c, out).await,
        AppCmd::Uninstall { agent, app } => {
            let r = AppRequest {
                agent,
                app,
                operation: AppOperation::Uninstall,
                version: None,
                values: None,
            };
            started(api.start_cluster_app(&r).await?, out)
        }
        AppCmd::List { agent } => list(api, agent, out).await,
    }
}

async fn change(api: &AdminClient, op: AppOperation, c: AppChange, out: Out) -> Result<()> {
    let values = match &c.values {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the values file {}", p.display()))?,
        ),
        None => None,
    };
    let r = AppRequest {
        agent: c.agent,
        app: c.app,
        operation: op,
        version: c.version,
        values,
    };
    started(api.start_cluster_app(&r).await?, out)
}

fn started(app: ClusterApp, out: Out) -> Result<()> {
    out.show(&app, |a| {
        println!(
            "{} of {} {} started: pod {} in gitlab-managed-apps (follow it with `kasctl cluster app list`)",
            a.operation.as_str(),
            a.name,
            a.version.as_deref().unwrap_or(""),
            a.pod
        )
    })
}

async fn list(api: &AdminClient, agent: String, out: Out) -> Result<()> {
    let apps = api.cluster_apps(&AppsQuery { agent }).await?;
    out.show(&apps, |apps| {
        let rows = apps
            .catalogue
            .iter()
            .map(|c| {
                let a = apps.apps.iter().find(|a| a.name == c.name);
                vec![
                    c.name.clone(),
                    a.map(|a| a.state.as_str()).unwrap_or("-").to_string(),
                    a.and_then(|a| a.version.clone()).unwrap_or_default(),
                    a.and_then(|a| a.error_code.clone()).unwrap_or_default(),
                    c.default_version.clone(),
                    c.description.clone(),
                ]
            })
            .collect();
        table(
            &[
                "APP",
                "STATE",
                "VERSION",
                "ERROR",
                "CATALOGUE VERSION",
                "DESCRIPTION",
            ],
            rows,
        )
    })
}
