use clap::Parser;
use kas::config::{Cli, Config};
use kas::Kas;

// Thousands of long-lived agent connections, each with small buffers: jemalloc keeps the
// memory per idle agent about a tenth lower than glibc's allocator (docs/benchmarks.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Accept loops and background work; connections are served on their own
    // single-threaded runtimes (`--worker-threads`, listeners::ConnRuntimes).
    let runtime = kas_telemetry::runtime(1)?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("kas: invalid configuration: {e}");
            }
            std::process::exit(2);
        }
    };
    let log_guard = match kas_telemetry::init(cli.log_level.as_deref(), &cli.log_format) {
        Ok((g, _)) => g,
        Err(e) => {
            eprintln!("kas: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    kas::heap::purge_in_background();
    let data_dir = config.data_dir.clone();
    let mut kas = match Kas::start(config).await {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kas: {e}");
            // exit() skips destructors: write out what was logged first.
            drop(log_guard);
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
    if let Some(p) = e.private {
        println!("kas: listening private http://{p}");
    }
    if let Some(id) = &e.kas_id {
        println!("kas: instance {id}");
    }
    if let Some(ca) = &e.k8s_proxy_ca_file {
        println!("kas: k8s proxy CA certificate {}", ca.display());
    }
    println!("kas: ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Only SIGTERM and SIGINT stop kas cleanly; a listener ending by itself is fatal.
    let ended = tokio::select! {
        _ = term.recv() => None,
        _ = tokio::signal::ctrl_c() => None,
        e = kas.wait() => Some(e),
    };
    match &ended {
        None => tracing::info!("shutting down"),
        Some(e) => tracing::error!(reason = %e, "a listener ended unexpectedly; stopping"),
    }
    kas.shutdown().await;
    drop(log_guard);
    if let Some(e) = ended {
        eprintln!("kas: {e}");
        std::process::exit(1);
    }
    Ok(())
}
