//! `kasctl cluster app ...`: managed applications.

use crate::cli::{AppChange, AppCmd, ClusterCmd, CreateCmd, EksCmd, EksCreateArgs};
use crate::client::AdminClient;
use crate::output::{table, Out};
use anyhow::{Context, Result};
use kas_api::admin::{AppRequest, AppsQuery, EksCreate, EksName, EksPrepare};
use kas_api::{AppOperation, ClusterApp, EksCluster, EksSpec, EksState};

pub async fn cluster(api: &AdminClient, cmd: ClusterCmd, out: Out) -> Result<()> {
    let cmd = match cmd {
        ClusterCmd::App(c) => c,
        ClusterCmd::Eks(EksCmd::Prepare { name, project }) => {
            return eks_prepare(api, name, project, out).await
        }
        ClusterCmd::Create(CreateCmd::Eks(a)) => return eks_create(api, a, out).await,
        ClusterCmd::Show { name, watch } => return eks_show(api, name, watch, out).await,
        ClusterCmd::Delete { name } => {
            let c = api.eks_delete(&EksName { name }).await?;
            return out.show(&c, |c| {
                println!(
                    "deleting EKS cluster {} (its stack, then its agent)",
                    c.name
                )
            });
        }
    };
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

async fn eks_prepare(api: &AdminClient, name: String, project: String, out: Out) -> Result<()> {
    let p = api.eks_prepare(&EksPrepare { name, project }).await?;
    out.show(&p, |p| {
        println!("EKS cluster {} prepared in {}.", p.cluster.name, p.cluster.project_path);
        println!("kas's AWS account: {}", p.account_id);
        println!("external id:       {}", p.external_id);
        println!("Create a role in your account with this trust policy, then run `kasctl cluster create eks {} --role-arn <its ARN> ...`:", p.cluster.name);
        println!("{}", p.trust_policy);
    })
}

async fn eks_create(api: &AdminClient, a: EksCreateArgs, out: Out) -> Result<()> {
    let spec = EksSpec {
        region: a.region,
        role_arn: a.role_arn,
        vpc_id: a.vpc,
        subnet_ids: a.subnets,
        security_group_id: a.security_group,
        cluster_role_arn: a.cluster_role_arn,
        kubernetes_version: a.kubernetes_version,
        instance_type: a.instance_type,
        node_count: a.nodes,
    };
    let c = api.eks_create(&EksCreate { name: a.name, spec }).await?;
    out.show(&c, |c| {
        println!(
            "creating EKS cluster {} ({}); follow it with `kasctl cluster show {} --watch`",
            c.name,
            c.state.as_str(),
            c.name
        )
    })
}

/// How far along creation is, out of the steps a cluster goes through.
fn progress(state: EksState) -> (usize, usize) {
    let steps = [
        EksState::AssumingRole,
        EksState::CreatingStack,
        EksState::StackInProgress,
        EksState::Configuring,
        EksState::InstallingAgent,
        EksState::Ready,
    ];
    let at = steps.iter().position(|s| *s == state).map_or(0, |i| i + 1);
    (at, steps.len())
}

fn print_cluster(c: &EksCluster, shown_events: usize) {
    let (at, of) = progress(c.state);
    let bar: String = (0..of).map(|i| if i < at { '#' } else { '.' }).collect();
    println!(
        "{} [{bar}] {}{}{}",
        c.name,
        c.state.as_str(),
        c.stack_status
            .as_deref()
            .map(|s| format!(" stack {s}"))
            .unwrap_or_default(),
        c.error_code
            .as_deref()
            .map(|e| format!(" error {e}"))
            .unwrap_or_default(),
    );
    for e in c.events.iter().skip(shown_events) {
        println!("  {} {} {}", e.time, e.resource, e.status);
    }
}

async fn eks_show(api: &AdminClient, name: Option<String>, watch: bool, out: Out) -> Result<()> {
    let Some(name) = name.clone().filter(|_| watch) else {
        let list = api.eks_clusters(name.as_deref()).await?;
        return out.show(&list, |list| {
            table(
                &[
                    "NAME", "PROJECT", "STATE", "STACK", "ENDPOINT", "AGENT", "ERROR",
                ],
                list.iter()
                    .map(|c| {
                        vec![
                            c.name.clone(),
                            c.project_path.clone(),
                            c.state.as_str().to_string(),
                            c.stack_status.clone().unwrap_or_default(),
                            c.endpoint.clone().unwrap_or_default(),
                            c.agent_id.map(|a| a.to_string()).unwrap_or_default(),
                            c.error_code.clone().unwrap_or_default(),
                        ]
                    })
                    .collect(),
            )
        });
    };
    let mut shown = 0;
    let mut last = None;
    loop {
        let c = api
            .eks_clusters(Some(&name))
            .await?
            .pop()
            .with_context(|| format!("EKS cluster `{name}` not found"))?;
        let key = (c.state, c.stack_status.clone(), c.events.len());
        if last.as_ref() != Some(&key) {
            if out.json {
                println!("{}", serde_json::to_string(&c)?);
            } else {
                print_cluster(&c, shown);
            }
            shown = c.events.len();
            last = Some(key);
        }
        if !c.state.is_active() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}
