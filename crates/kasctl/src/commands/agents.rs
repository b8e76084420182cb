//! `kasctl agent ...` (registration, configuration, tokens) and `kasctl agents`
//! (connected agents).

use crate::cli::{AgentCmd, ConfigCmd, TokenCmd};
use crate::client::AdminClient;
use crate::output::{or_dash, since, table, write_private, Out};
use anyhow::{Context, Result};
use kas_api::admin::{AgentName, NamedConnectedAgent, SetConfig, TokenRequest};
use std::path::{Path, PathBuf};

pub async fn agent(api: &AdminClient, cmd: AgentCmd, out: Out) -> Result<()> {
    match cmd {
        AgentCmd::Create {
            project,
            name,
            write_token,
        } => create(api, AgentName { project, name }, write_token, out).await,
        AgentCmd::Delete { project, name } => {
            let a = api.delete_agent(&AgentName { project, name }).await?;
            out.show(&a, |a| {
                println!(
                    "agent {} (id {}) deleted from {}; its tokens no longer work",
                    a.name, a.id, a.project_path
                )
            })
        }
        AgentCmd::List => out.show(&api.agents().await?, |list| {
            table(
                &["ID", "NAME", "CONFIG PROJECT", "CONFIG VERSION"],
                list.iter()
                    .map(|a| {
                        vec![
                            a.id.to_string(),
                            a.name.clone(),
                            a.project_path.clone(),
                            a.config_version.to_string(),
                        ]
                    })
                    .collect(),
            )
        }),
        AgentCmd::Config(c) => config(api, c, out).await,
        AgentCmd::Token(t) => token(api, t, out).await,
    }
}

async fn create(
    api: &AdminClient,
    name: AgentName,
    write_token: Option<PathBuf>,
    out: Out,
) -> Result<()> {
    let created = api.create_agent(&name).await?;
    if let Some(f) = &write_token {
        write_private(f, &format!("{}\n", created.token))?;
    }
    let a = &created.agent;
    let summary = serde_json::json!({
        "id": a.id, "name": a.name, "project": a.project_path, "token": created.token,
    });
    out.show(&summary, |_| {
        println!(
            "agent {} (id {}) registered in {}",
            a.name, a.id, a.project_path
        );
        shown_once(write_token.as_deref(), &created.token);
    })
}

/// Where a new secret went: a file, or the terminal (once).
fn shown_once(file: Option<&Path>, secret: &str) {
    match file {
        Some(f) => println!("token written to {} (it is not shown again)", f.display()),
        None => println!("token (shown once; store it now): {secret}"),
    }
}

async fn config(api: &AdminClient, cmd: ConfigCmd, out: Out) -> Result<()> {
    match cmd {
        ConfigCmd::Set {
            project,
            name,
            file,
        } => {
            let config = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let context = format!("{project}:{name}");
            let saved = api
                .set_config(&SetConfig {
                    project,
                    name,
                    config,
                })
                .await?;
            out.show(&saved, |s| {
                for w in &s.warnings {
                    eprintln!("warning: {w}");
                }
                println!("configuration of {context} stored as version {}", s.version);
            })
        }
        ConfigCmd::Get { project, name } => {
            let c = api.config(&AgentName { project, name }).await?;
            out.show(&c, |c| print!("{}", c.config))
        }
    }
}

async fn token(api: &AdminClient, cmd: TokenCmd, out: Out) -> Result<()> {
    match cmd {
        TokenCmd::Create {
            project,
            agent,
            token_name,
            write_token,
        } => {
            let context = format!("{project}:{agent}");
            let r = TokenRequest {
                project,
                name: agent,
                token: token_name,
            };
            let created = api.create_token(&r).await?;
            if let Some(f) = &write_token {
                write_private(f, &format!("{}\n", created.secret))?;
            }
            out.show(&created, |c| {
                println!(
                    "token {} (id {}) created for {context}",
                    c.token.name, c.token.id
                );
                shown_once(write_token.as_deref(), &c.secret);
            })
        }
        TokenCmd::List { project, agent } => {
            let list = api
                .tokens(&AgentName {
                    project,
                    name: agent,
                })
                .await?;
            out.show(&list, |list| tokens_table(list))
        }
        TokenCmd::Revoke {
            project,
            agent,
            token,
        } => {
            let context = format!("{project}:{agent}");
            let r = TokenRequest {
                project,
                name: agent,
                token: Some(token),
            };
            let t = api.revoke_token(&r).await?;
            out.show(&t, |t| {
                println!(
                    "token {} (id {}) of {context} revoked; connections made with it are closed",
                    t.name, t.id
                )
            })
        }
    }
}

fn tokens_table(list: &[kas_api::AgentToken]) {
    let ago = |t: Option<i64>| match t {
        Some(t) => format!("{} ago", since(u64::try_from(t).unwrap_or(0))),
        None => "never".into(),
    };
    table(
        &["ID", "NAME", "STATUS", "CREATED", "LAST USED"],
        list.iter()
            .map(|t| {
                vec![
                    t.id.to_string(),
                    t.name.clone(),
                    match t.revoked_at {
                        Some(r) => format!("revoked {} ago", since(u64::try_from(r).unwrap_or(0))),
                        None => "active".into(),
                    },
                    ago(Some(t.created_at)),
                    ago(t.last_used_at),
                ]
            })
            .collect(),
    );
}

/// `kasctl agents [--replicas]`.
pub async fn connected(api: &AdminClient, replicas: bool, out: Out) -> Result<()> {
    let list = api.connected_agents().await?;
    out.show(&list, |list| {
        if replicas {
            replica_table(list)
        } else {
            agents_table(list)
        }
        warn_replicas(list);
    })
}

/// The distinct non-empty values of `f` over `items`, comma-separated (`-` if none).
fn distinct<T>(items: &[T], f: impl Fn(&T) -> &str) -> String {
    let mut vals: Vec<&str> = items.iter().map(f).filter(|s| !s.is_empty()).collect();
    vals.sort_unstable();
    vals.dedup();
    or_dash(&vals.join(","))
}

/// One row per agent.
fn agents_table(list: &[NamedConnectedAgent]) {
    table(
        &[
            "ID",
            "NAME",
            "CONFIG PROJECT",
            "REPLICAS",
            "IDLE TUNNELS",
            "BUSY",
            "SINCE",
            "VERSION",
            "KUBERNETES",
            "KAS",
        ],
        list.iter()
            .map(|a| {
                let reps = &a.state.replicas;
                let first = reps.iter().map(|r| r.connected_since).min().unwrap_or(0);
                vec![
                    a.id.to_string(),
                    a.name.clone(),
                    a.config_project.clone(),
                    reps.len().to_string(),
                    a.state.idle_tunnels.to_string(),
                    a.state.busy_tunnels.to_string(),
                    since(first),
                    distinct(reps, |r| &r.agent_version),
                    distinct(reps, |r| &r.meta.kubernetes_version),
                    distinct(reps, |r| r.kas.as_deref().unwrap_or_default()),
                ]
            })
            .collect(),
    );
}

/// One row per agent replica.
fn replica_table(list: &[NamedConnectedAgent]) {
    let mut rows = Vec::new();
    for a in list {
        for r in &a.state.replicas {
            rows.push(vec![
                a.id.to_string(),
                a.name.clone(),
                r.replica_id.clone(),
                or_dash(&r.meta.pod_namespace),
                or_dash(&r.meta.pod_name),
                or_dash(&r.meta.node_name),
                or_dash(&r.agent_version),
                or_dash(&r.meta.kubernetes_version),
                since(r.connected_since),
                or_dash(r.kas.as_deref().unwrap_or_default()),
            ]);
        }
    }
    table(
        &[
            "ID",
            "NAME",
            "REPLICA",
            "NAMESPACE",
            "POD",
            "NODE",
            "VERSION",
            "KUBERNETES",
            "SINCE",
            "KAS",
        ],
        rows,
    );
}

/// Prints each replica's warning (such as version skew) on stderr.
fn warn_replicas(list: &[NamedConnectedAgent]) {
    for a in list {
        for r in &a.state.replicas {
            if let Some(w) = &r.warning {
                eprintln!("warning: agent {} replica {}: {w}", a.id, r.replica_id);
            }
        }
    }
}
