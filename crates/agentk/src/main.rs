use agentk::{ClusterAccess, ConnectOptions, Upstream};
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

/// agentk: the in-cluster agent. Dials kas and serves requests from it against this cluster.
#[derive(Debug, Parser)]
#[command(name = "agentk", version)]
struct Cli {
    /// kas agent listener: grpc://host:port or grpcs://host:port. Repeat it (or use a
    /// name resolving to several addresses) for several kas replicas.
    #[arg(
        long,
        env = "AGENTK_KAS_ADDRESS",
        value_delimiter = ',',
        required = true
    )]
    kas_address: Vec<String>,
    /// File holding the agent token.
    #[arg(long, env = "AGENTK_TOKEN_FILE")]
    token_file: PathBuf,
    /// Kubeconfig for the cluster (outside a cluster); in a pod the ServiceAccount is used.
    #[arg(long, env = "AGENTK_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Context of the kubeconfig to use (default: its current context).
    #[arg(long)]
    context: Option<String>,
    /// PEM CA certificate to trust for a grpcs:// kas with a self-signed certificate
    /// (the system's CAs are trusted too).
    #[arg(long, env = "AGENTK_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// A header sent to kas with every stream, `NAME:VALUE` (repeat it), e.g. for an
    /// authenticating proxy or gateway in front of kas.
    #[arg(long = "kas-header", value_name = "NAME:VALUE")]
    kas_headers: Vec<String>,
    /// The name kas's TLS certificate must carry, when the address names kas otherwise
    /// (an IP, an internal name).
    #[arg(long, env = "AGENTK_KAS_TLS_SERVER_NAME")]
    kas_tls_server_name: Option<String>,
    /// Do not verify kas's TLS certificate. Anyone between agentk and kas can then read
    /// and change the traffic, the agent token included: for tests only.
    #[arg(long)]
    kas_insecure_skip_tls_verify: bool,
    /// Idle tunnels kept open to kas.
    #[arg(long, default_value_t = 2)]
    min_idle_tunnels: usize,
    /// Upper bound of tunnels (concurrent requests) per replica.
    #[arg(long, default_value_t = 512)]
    max_tunnels: usize,
    /// Log filter (e.g. info, agentk=debug); RUST_LOG also works.
    #[arg(long, env = "AGENTK_LOG_LEVEL")]
    log_level: Option<String>,
    /// Runtime threads: 1 (default) runs everything on one thread; 0 uses one per core.
    #[arg(long, env = "AGENTK_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
    /// Observability endpoint (/healthz, /readyz, /metrics), e.g. 0.0.0.0:8080; off if absent.
    #[arg(long, env = "AGENTK_LISTEN_OBSERVABILITY")]
    listen_observability: Option<std::net::SocketAddr>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

/// Headers agentk sets itself, or that HTTP/2 and gRPC reserve.
const RESERVED_HEADERS: [&str; 9] = [
    "authorization",
    "content-type",
    "te",
    "user-agent",
    "host",
    "connection",
    "x-agent-replica-id",
    "x-agent-version",
    "grpc-timeout",
];

/// `NAME:VALUE` of `--kas-header` as gRPC metadata.
fn parse_kas_header(
    h: &str,
) -> Result<
    (
        tonic::metadata::MetadataKey<tonic::metadata::Ascii>,
        tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    ),
    Fatal,
> {
    let bad = |why: &str| Fatal(format!("--kas-header `{h}`: {why}"));
    let (name, value) = h.split_once(':').ok_or_else(|| bad("use NAME:VALUE"))?;
    let name = name.trim().to_ascii_lowercase();
    if RESERVED_HEADERS.contains(&name.as_str())
        || name.starts_with("grpc-")
        || name.starts_with(':')
    {
        return Err(bad("agentk sets this header itself"));
    }
    let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes())
        .map_err(|_| bad("not a valid header name"))?;
    let value = tonic::metadata::MetadataValue::try_from(value.trim())
        .map_err(|_| bad("not a valid header value"))?;
    Ok((key, value))
}

/// A setting the operator must fix: reported on stderr, exit status 2. It travels back
/// out of `run` so the log writer is flushed before the process exits.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Fatal(String);

// Every exchange allocates and frees frames and buffers; glibc's allocator took about a
// tenth of agentk's CPU time under load (perf), jemalloc much less.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // kube's TLS takes the process's crypto provider: ring, as the rest of agentk.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread by default: agentk forwards bytes and does little else, and a single
    // thread avoids cross-thread wake-ups on every frame (lower latency, measured).
    let runtime = kas_telemetry::runtime(cli.worker_threads)?;
    match runtime.block_on(run(cli)) {
        Err(e) if e.is::<Fatal>() => {
            eprintln!("agentk: {e}");
            std::process::exit(2);
        }
        other => other,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (_log_guard, log_level) = kas_telemetry::init(cli.log_level.as_deref(), &cli.log_format)
        .map_err(|e| Fatal(e.to_string()))?;
    let token = read_token(&cli.token_file)?;
    let ca_cert_pem = match &cli.ca_cert {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| Fatal(format!("cannot read --ca-cert {}: {e}", p.display())))?,
        ),
        None => None,
    };
    if cli.min_idle_tunnels == 0 || cli.max_tunnels < cli.min_idle_tunnels {
        return Err(Fatal(
            "--min-idle-tunnels must be at least 1 and at most --max-tunnels".into(),
        )
        .into());
    }
    let access = match &cli.kubeconfig {
        Some(p) => ClusterAccess::from_kubeconfig(p, cli.context.as_deref()).await,
        None => ClusterAccess::in_cluster(),
    }
    .map_err(|e| Fatal(e.to_string()))?;
    tracing::info!(cluster = %access.server(), kas = ?cli.kas_address, "agentk starting");
    // Set by the Deployment from the downward API; empty outside a cluster.
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let meta = kas_proto::v1::AgentMeta {
        pod_name: env("POD_NAME"),
        pod_namespace: env("POD_NAMESPACE"),
        node_name: env("NODE_NAME"),
        kubernetes_version: String::new(),
    };
    let upstream = Arc::new(
        Upstream::new(access)
            .map_err(|e| Fatal(e.to_string()))?
            .with_meta(meta)
            .with_log_level(log_level),
    );
    let kas_headers = cli
        .kas_headers
        .iter()
        .map(|h| parse_kas_header(h))
        .collect::<Result<Vec<_>, _>>()?;
    if cli.kas_insecure_skip_tls_verify {
        tracing::error!("--kas-insecure-skip-tls-verify: kas's TLS certificate is NOT verified; anyone on the path can read the agent token and the cluster traffic. Use --ca-cert instead.");
    }
    let proxy = agentk::dial::ProxyConfig::from_env().map_err(|e| Fatal(e.to_string()))?;
    if proxy.https.is_some() || proxy.http.is_some() {
        tracing::info!(proxy = ?proxy, "reaching kas through a proxy where NO_PROXY does not exclude it");
    }
    let opts = ConnectOptions {
        kas_headers,
        tls_server_name: cli.kas_tls_server_name,
        insecure_skip_tls_verify: cli.kas_insecure_skip_tls_verify,
        proxy,
        kas_addresses: cli.kas_address,
        token,
        ca_cert_pem,
        min_idle_tunnels: cli.min_idle_tunnels,
        max_tunnels: cli.max_tunnels,
        replica_id: format!("{:016x}", rand::random::<u64>()),
    };
    let _observability = match cli.listen_observability {
        Some(addr) => Some(serve_observability(addr, &upstream).await?),
        None => None,
    };
    let (config_tx, _config_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let runner = tokio::spawn(agentk::run(opts, upstream, config_tx, stop_rx));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = stop_tx.send(true);
    let _ = runner.await;
    Ok(())
}

/// The agent token from its file (trimmed; an empty file is an error).
fn read_token(path: &std::path::Path) -> Result<String, Fatal> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| Fatal(format!("cannot read --token-file {}: {e}", path.display())))?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(Fatal(format!("--token-file {} is empty", path.display())));
    }
    Ok(token)
}

/// Serves `/metrics` and the health endpoints until the handle is dropped.
async fn serve_observability(
    addr: std::net::SocketAddr,
    upstream: &Upstream,
) -> anyhow::Result<AbortOnDropHandle<()>> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Fatal(format!("cannot bind --listen-observability {addr}: {e}")))?;
    let bound = l.local_addr()?;
    tracing::info!(address = %bound, "listening observability http://{bound}");
    Ok(AbortOnDropHandle::new(tokio::spawn(agentk::stats::serve(
        l,
        upstream.stats.clone(),
    ))))
}
