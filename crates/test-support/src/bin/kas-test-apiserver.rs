//! Command-line entry of the TEST API server, for trying kas and agentk without a
//! cluster. It is not Kubernetes.

use clap::Parser;
use kas_test_support::TestApiServer;
use std::path::PathBuf;

/// TEST API SERVER: a stand-in for a Kubernetes API server, for trying kas and agentk
/// without a cluster. It is NOT Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "kas-test-apiserver", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: String,
    /// Write a kubeconfig for agentk here.
    #[arg(long, default_value = "cluster.yaml")]
    kubeconfig: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(&cli.listen).await?;
    let token = format!("test-sa-token-{:016x}", rand::random::<u64>());
    let server = TestApiServer::start_on(listener, token).await?;
    std::fs::write(&cli.kubeconfig, server.kubeconfig())?;
    println!("*** TEST API SERVER — not a Kubernetes cluster; for trying kas/agentk only ***");
    println!("listening on {}", server.url());
    println!(
        "kubeconfig for agentk written to {}",
        cli.kubeconfig.display()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
