//! One module per area of kasctl's commands; [`run`] dispatches.

mod access;
mod agents;
mod audit;
mod cluster;
mod jobs;
mod paths;

use crate::cli::{Cli, Cmd, Output};
use crate::client::AdminClient;
use crate::output::Out;
use anyhow::{Context, Result};

/// Runs one command line.
pub async fn run(cli: Cli) -> Result<()> {
    // Needs no server and no token.
    if let Cmd::Completion { shell } = cli.cmd {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "kasctl", &mut script);
        // A closed pipe (`| head`) is not an error worth a message.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
        return Ok(());
    }
    let token = std::fs::read_to_string(&cli.token_file)
        .with_context(|| {
            format!(
                "cannot read the admin token file {} (set --token-file or KASCTL_TOKEN_FILE)",
                cli.token_file.display()
            )
        })?
        .trim()
        .to_string();
    let api = AdminClient::new(&cli.server, token);
    let out = Out {
        json: cli.output == Output::Json,
    };
    match cli.cmd {
        // Handled above, before the token is read.
        Cmd::Completion { .. } => Ok(()),
        Cmd::Group(c) => paths::groups(&api, c, out).await,
        Cmd::Project(c) => paths::projects(&api, c, out).await,
        Cmd::Agent(c) => agents::agent(&api, c, out).await,
        Cmd::Agents { replicas } => agents::connected(&api, replicas, out).await,
        Cmd::Environment(c) => jobs::environment(&api, c, out).await,
        Cmd::Job(c) => jobs::job(&api, c, out).await,
        Cmd::Audit(a) => audit::audit(&api, a, out).await,
        Cmd::Access(c) => access::access(&api, c, out).await,
        Cmd::Cluster(c) => cluster::cluster(&api, c, out).await,
    }
}
