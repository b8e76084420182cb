use clap::Parser;
use kas_server::config::{Cli, Config};
use kas_server::Kas;

/// Logs go to stderr through a writer thread, so a request never waits on the write.
/// The returned guard flushes on drop; keep it for the life of the process.
fn init_tracing(level: Option<&str>, format: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = level
        .map(tracing_subscriber::EnvFilter::new)
        .or_else(|| tracing_subscriber::EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
    guard
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("kas: invalid configuration: {e}");
            }
            std::process::exit(2);
        }
    };
    if !matches!(cli.log_format.as_str(), "text" | "json") {
        eprintln!("kas: invalid configuration: --log-format must be text or json");
        std::process::exit(2);
    }
    let _log_guard = init_tracing(cli.log_level.as_deref(), &cli.log_format);
    let data_dir = config.data_dir.clone();
    let mut kas = match Kas::start(config).await {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kas: {e}");
            std::process::exit(1);
        }
    };
    let e = &kas.endpoints;
    let agent_scheme = if e.agent_tls { "grpcs" } else { "grpc" };
    println!("kas: data dir {}", data_dir.display());
    println!("kas: admin token file {}", e.admin_token_file.display());
    println!("kas: listening agent {agent_scheme}://{}", e.agent);
    println!("kas: listening api http://{}", e.api);
    println!("kas: listening k8s_proxy {}", e.k8s_proxy_url);
    println!("kas: listening observability http://{}", e.observability);
    if let Some(ca) = &e.k8s_proxy_ca_file {
        println!("kas: k8s proxy CA certificate {}", ca.display());
    }
    println!("kas: ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = kas.wait() => {}
    }
    tracing::info!("shutting down");
    kas.shutdown().await;
    Ok(())
}
