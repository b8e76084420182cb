//! `kasctl group ...` and `kasctl project ...`.

use crate::cli::PathCmd;
use crate::client::AdminClient;
use crate::output::{table, Out};
use anyhow::Result;
use kas_api::admin::CreatePath;

pub async fn groups(api: &AdminClient, cmd: PathCmd, out: Out) -> Result<()> {
    match cmd {
        PathCmd::Create { path, id } => {
            let g = api.create_group(&CreatePath { path, id }).await?;
            out.show(&g, |g| println!("group {} (id {})", g.path, g.id))
        }
        PathCmd::List => out.show(&api.groups().await?, |list| {
            table(
                &["ID", "PATH", "PARENT ID"],
                list.iter()
                    .map(|g| vec![g.id.to_string(), g.path.clone(), opt(g.parent_id)])
                    .collect(),
            )
        }),
    }
}

pub async fn projects(api: &AdminClient, cmd: PathCmd, out: Out) -> Result<()> {
    match cmd {
        PathCmd::Create { path, id } => {
            let p = api.create_project(&CreatePath { path, id }).await?;
            out.show(&p, |p| println!("project {} (id {})", p.path, p.id))
        }
        PathCmd::List => out.show(&api.projects().await?, |list| {
            table(
                &["ID", "PATH", "GROUP ID"],
                list.iter()
                    .map(|p| vec![p.id.to_string(), p.path.clone(), p.group_id.to_string()])
                    .collect(),
            )
        }),
    }
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}
