//! kas configuration: a YAML file, environment variables and flags (flags win over
//! the environment, which wins over the file). Every problem is reported at once,
//! before anything is bound.

mod file;
mod limits;

pub use limits::{AgentSettings, ListenerLimits};

use file::{FileConfig, FileTls};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Command line (each flag also reads an environment variable).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "kas",
    version,
    about = "The agent server: agents dial in, CI jobs and applications reach their clusters through it"
)]
pub struct Cli {
    /// YAML configuration file.
    #[arg(long, env = "KAS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the embedded control plane, generated certificates and the admin token.
    #[arg(long, env = "KAS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Agent listener (gRPC), e.g. 127.0.0.1:8150.
    #[arg(long, env = "KAS_LISTEN_AGENT")]
    pub listen_agent: Option<String>,
    /// API listener (admin API), e.g. 127.0.0.1:8153.
    #[arg(long, env = "KAS_LISTEN_API")]
    pub listen_api: Option<String>,
    /// Kubernetes API proxy listener, e.g. 127.0.0.1:8154.
    #[arg(long, env = "KAS_LISTEN_K8S_PROXY")]
    pub listen_k8s_proxy: Option<String>,
    /// Observability listener (/healthz, /readyz), e.g. 127.0.0.1:8151.
    #[arg(long, env = "KAS_LISTEN_OBSERVABILITY")]
    pub listen_observability: Option<String>,
    /// Private kas-to-kas API listener (used with Redis), e.g. 127.0.0.1:8155.
    #[arg(long, env = "KAS_LISTEN_PRIVATE")]
    pub listen_private: Option<String>,
    /// URL other kas replicas use to reach this one's private API (default: from the
    /// listen address, which must then not be 0.0.0.0).
    #[arg(long, env = "KAS_PRIVATE_URL")]
    pub private_url: Option<String>,
    /// Redis URL for the shared agent registry (several kas replicas); absent = in memory.
    #[arg(long, env = "KAS_REDIS_URL")]
    pub redis_url: Option<String>,
    /// PostgreSQL URL for the shared control plane; absent = SQLite in the data dir.
    #[arg(long, env = "KAS_CONTROLPLANE_URL")]
    pub controlplane_url: Option<String>,
    /// File with the secret (at least 32 bytes) that signs the application's JWTs;
    /// absent = the application API is off.
    #[arg(long, env = "KAS_APPLICATION_SECRET_FILE")]
    pub application_secret_file: Option<PathBuf>,
    /// Audit trail: a file (default `<data dir>/audit.jsonl`) or `-` for stdout.
    #[arg(long, env = "KAS_AUDIT_FILE")]
    pub audit_file: Option<String>,
    /// URL CI jobs use to reach the Kubernetes API proxy (goes into job kubeconfigs).
    #[arg(long, env = "KAS_K8S_PROXY_URL")]
    pub k8s_proxy_url: Option<String>,
    /// Log filter (e.g. info, kas=debug); RUST_LOG also works.
    #[arg(long, env = "KAS_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "KAS_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Threads serving connections, each with its own single-threaded runtime; 0
    /// (default): half the cores, at least one. Accepting and background work run on
    /// one more. A request whose client and agent connections sit on different threads
    /// crosses between them, which costs CPU (docs/benchmarks.md): one thread per two
    /// cores leaves room for the rest of the machine.
    #[arg(long, env = "KAS_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Create EKS clusters in customers' AWS accounts (kas's own AWS credentials come
    /// from the standard chain: environment, profile, web identity, instance role).
    #[arg(long, env = "KAS_EKS")]
    pub eks: bool,
    /// The CloudFormation template EKS clusters are created with (default: the one
    /// shipped, deploy/eks/cluster.yaml).
    #[arg(long, env = "KAS_EKS_TEMPLATE_FILE")]
    pub eks_template_file: Option<PathBuf>,
    /// The first delay between polls of a cluster's stack (it doubles, up to 16 times).
    #[arg(long, env = "KAS_EKS_POLL_INTERVAL", default_value = "15s")]
    pub eks_poll_interval: String,
    /// How agentk installed by kas (in new EKS clusters) reaches kas, e.g.
    /// grpcs://kas.example.com:8150 (default: from the agent listener).
    #[arg(long, env = "KAS_AGENT_URL")]
    pub agent_url: Option<String>,
    /// The agentk image installed into new EKS clusters.
    #[arg(
        long,
        env = "KAS_AGENTK_IMAGE",
        default_value = "registry.example.com/kas:0.1.0"
    )]
    pub agentk_image: String,
}

/// Creating EKS clusters (`--eks`).
#[derive(Debug, Clone)]
pub struct EksConfig {
    pub template: String,
    pub poll: Duration,
    pub agent_url: Option<String>,
    pub agentk_image: String,
}

fn eks_settings(cli: &Cli, errors: &mut Vec<String>) -> Option<EksConfig> {
    if !cli.eks {
        return None;
    }
    let template = match &cli.eks_template_file {
        None => crate::cluster::eks::TEMPLATE.to_string(),
        Some(p) => std::fs::read_to_string(p).unwrap_or_else(|e| {
            errors.push(format!("--eks-template-file {}: {e}", p.display()));
            String::new()
        }),
    };
    let poll = parse_duration(&cli.eks_poll_interval).unwrap_or_else(|e| {
        errors.push(format!("--eks-poll-interval: {e}"));
        Duration::from_secs(15)
    });
    if let Some(u) = &cli.agent_url {
        if !(u.starts_with("grpc://") || u.starts_with("grpcs://")) {
            errors.push(format!(
                "--agent-url `{u}` must be a grpc:// or grpcs:// URL"
            ));
        }
    }
    Some(EksConfig {
        template,
        poll,
        agent_url: cli.agent_url.clone(),
        agentk_image: cli.agentk_image.clone(),
    })
}

impl Default for Cli {
    /// What an empty command line means (used by tests and embedders).
    fn default() -> Self {
        Cli {
            config: None,
            data_dir: None,
            listen_agent: None,
            listen_api: None,
            listen_k8s_proxy: None,
            listen_observability: None,
            listen_private: None,
            private_url: None,
            redis_url: None,
            controlplane_url: None,
            application_secret_file: None,
            audit_file: None,
            k8s_proxy_url: None,
            log_level: None,
            log_format: "text".into(),
            worker_threads: 0,
            eks: false,
            eks_template_file: None,
            eks_poll_interval: "15s".into(),
            agent_url: None,
            agentk_image: "registry.example.com/kas:0.1.0".into(),
        }
    }
}

/// A certificate and key in PEM files, and optionally the CA clients should trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub certificate_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: Option<PathBuf>,
}

/// How the Kubernetes API proxy listener does TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyTls {
    /// A CA and serving certificate generated in the data dir on first start.
    Generated,
    Files(TlsFiles),
    Plaintext,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen_agent: SocketAddr,
    pub listen_api: SocketAddr,
    pub listen_k8s_proxy: SocketAddr,
    pub listen_observability: SocketAddr,
    pub agent_tls: Option<TlsFiles>,
    pub k8s_proxy_tls: ProxyTls,
    /// None: derived from the bound address.
    pub k8s_proxy_url: Option<String>,
    pub agent_wait_timeout: Duration,
    pub listen_private: SocketAddr,
    /// Several replicas: the shared registry and the private API (None: single kas).
    pub shared: Option<SharedConfig>,
    /// PostgreSQL URL (None: SQLite in the data dir).
    pub controlplane_url: Option<String>,
    /// The application API (None: off).
    pub application: Option<ApplicationConfig>,
    /// Where audit records go.
    pub audit: crate::audit::AuditTarget,
    /// Connection limits of each listener.
    pub limits: ListenerLimits,
    /// The agent connection's own settings.
    pub agent: AgentSettings,
    /// Creating EKS clusters (None: off).
    pub eks: Option<EksConfig>,
    /// Threads serving connections (`--worker-threads`, 0 resolved to the cores).
    pub worker_threads: usize,
}

/// The application API's settings.
#[derive(Clone)]
pub struct ApplicationConfig {
    pub secret: Vec<u8>,
    pub integration_log_file: Option<PathBuf>,
}

impl std::fmt::Debug for ApplicationConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplicationConfig")
            .field("secret", &"<redacted>")
            .field("integration_log_file", &self.integration_log_file)
            .finish()
    }
}

/// Reads a shared secret file (trimmed), recording a problem if it is unusable.
fn read_secret(what: &str, path: &Path, errors: &mut Vec<String>) -> Vec<u8> {
    match std::fs::read(path) {
        Ok(s) => {
            let s = s.trim_ascii().to_vec();
            if s.len() < 32 {
                errors.push(format!(
                    "{what} {}: the secret must be at least 32 bytes",
                    path.display()
                ));
            }
            s
        }
        Err(e) => {
            errors.push(format!("{what} {}: {e}", path.display()));
            Vec::new()
        }
    }
}

/// Settings of a kas that is one of several replicas.
#[derive(Clone)]
pub struct SharedConfig {
    pub redis_url: String,
    pub key_prefix: String,
    pub expiry: Duration,
    /// None: derived from the bound private listener.
    pub private_url: Option<String>,
    /// Shared secret of the private API.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConfig")
            .field("redis_url", &mask_url(&self.redis_url))
            .field("key_prefix", &self.key_prefix)
            .field("expiry", &self.expiry)
            .field("private_url", &self.private_url)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// A URL with any password replaced, for logs.
pub fn mask_url(u: &str) -> String {
    match (u.find("://"), u.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &u[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &u[..s + 3], &u[at..]),
                None => u.to_string(),
            }
        }
        _ => u.to_string(),
    }
}

/// Parses a duration such as `20s`, `500ms`, `2m`, `1h 30m` (humantime's syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}; e.g. 500ms, 20s, 2m, 1h)"))
}

/// The addresses of the five listeners.
struct Listen {
    agent: SocketAddr,
    api: SocketAddr,
    k8s_proxy: SocketAddr,
    observability: SocketAddr,
    private: SocketAddr,
}

/// The Kubernetes API proxy's settings (and the agent listener's TLS).
struct ProxySettings {
    agent_tls: Option<TlsFiles>,
    k8s_proxy_tls: ProxyTls,
    k8s_proxy_url: Option<String>,
    agent_wait_timeout: Duration,
}

impl Config {
    /// Builds the configuration from flags/environment and the optional file,
    /// returning every problem found.
    pub fn load(cli: &Cli) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let file = match cli.config.as_deref().map(file::read) {
            None => FileConfig::default(),
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                errors.push(e);
                FileConfig::default()
            }
        };
        let listen = listen_addresses(cli, &file, &mut errors);
        let proxy = proxy_settings(cli, &file, &mut errors);
        if !matches!(cli.log_format.as_str(), "text" | "json") {
            errors.push(format!(
                "--log-format must be text or json, not `{}`",
                cli.log_format
            ));
        }
        let shared = shared_settings(cli, &file, listen.private, &mut errors);
        let application = application_settings(cli, &file, &mut errors);
        let controlplane_url = cli
            .controlplane_url
            .clone()
            .or(file.controlplane.url.clone());
        if let Some(u) = &controlplane_url {
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                errors.push(format!(
                    "controlplane.url `{}` must be a postgres:// URL",
                    mask_url(u)
                ));
            }
        }
        let data_dir = cli
            .data_dir
            .clone()
            .or(file.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("./kas-data"));
        if data_dir.exists() && !data_dir.is_dir() {
            errors.push(format!(
                "data dir {} exists and is not a directory",
                data_dir.display()
            ));
        }
        let audit = match cli.audit_file.clone().or(file.audit.file.clone()) {
            Some(f) if f == "-" => crate::audit::AuditTarget::Stdout,
            Some(f) => crate::audit::AuditTarget::File(PathBuf::from(f)),
            None => crate::audit::AuditTarget::File(data_dir.join("audit.jsonl")),
        };
        let (limits, agent) = limits::connection_settings(&file, &mut errors);
        let eks = eks_settings(cli, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Config {
            data_dir,
            listen_agent: listen.agent,
            listen_api: listen.api,
            listen_k8s_proxy: listen.k8s_proxy,
            listen_observability: listen.observability,
            agent_tls: proxy.agent_tls,
            k8s_proxy_tls: proxy.k8s_proxy_tls,
            k8s_proxy_url: proxy.k8s_proxy_url,
            agent_wait_timeout: proxy.agent_wait_timeout,
            listen_private: listen.private,
            shared,
            controlplane_url,
            application,
            audit,
            limits,
            agent,
            eks,
            worker_threads: match cli.worker_threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2)),
                n => n,
            },
        })
    }
}

/// The listen addresses (flag, then file, then default), each parsed and none shared.
fn listen_addresses(cli: &Cli, file: &FileConfig, errors: &mut Vec<String>) -> Listen {
    let mut addr = |name: &str, flag: &Option<String>, file: &Option<String>, default: &str| {
        let v = flag
            .clone()
            .or_else(|| file.clone())
            .unwrap_or_else(|| default.to_string());
        v.parse::<SocketAddr>().unwrap_or_else(|_| {
            errors.push(format!(
                "listen address for {name} `{v}` is not host:port (e.g. 127.0.0.1:8150)"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    };
    let l = &file.listen;
    let listen = Listen {
        agent: addr("agent", &cli.listen_agent, &l.agent, "127.0.0.1:8150"),
        api: addr("api", &cli.listen_api, &l.api, "127.0.0.1:8153"),
        k8s_proxy: addr(
            "k8s_proxy",
            &cli.listen_k8s_proxy,
            &l.k8s_proxy,
            "127.0.0.1:8154",
        ),
        observability: addr(
            "observability",
            &cli.listen_observability,
            &l.observability,
            "127.0.0.1:8151",
        ),
        private: addr("private", &cli.listen_private, &l.private, "127.0.0.1:8155"),
    };
    let all = [
        ("private", listen.private),
        ("agent", listen.agent),
        ("api", listen.api),
        ("k8s_proxy", listen.k8s_proxy),
        ("observability", listen.observability),
    ];
    for (i, (n1, a1)) in all.iter().enumerate() {
        for (n2, a2) in &all[i + 1..] {
            if a1 == a2 && a1.port() != 0 {
                errors.push(format!(
                    "listeners {n1} and {n2} both use {a1}; each listener needs its own socket"
                ));
            }
        }
    }
    listen
}

/// A listener's TLS files, each checked to exist.
fn tls_files(what: &str, t: &Option<FileTls>, errors: &mut Vec<String>) -> Option<TlsFiles> {
    let t = t.as_ref()?;
    let files = [
        ("certificate_file", Some(&t.certificate_file)),
        ("key_file", Some(&t.key_file)),
        ("ca_file", t.ca_file.as_ref()),
    ];
    for (k, p) in files.into_iter().filter_map(|(k, p)| p.map(|p| (k, p))) {
        if !Path::new(p).is_file() {
            errors.push(format!(
                "{what}.tls.{k}: {} does not exist or is not a file",
                p.display()
            ));
        }
    }
    Some(TlsFiles {
        certificate_file: t.certificate_file.clone(),
        key_file: t.key_file.clone(),
        ca_file: t.ca_file.clone(),
    })
}

fn proxy_settings(cli: &Cli, file: &FileConfig, errors: &mut Vec<String>) -> ProxySettings {
    let agent_tls = tls_files("agent", &file.agent.tls, errors);
    let proxy_files = tls_files("k8s_proxy", &file.k8s_proxy.tls, errors);
    let k8s_proxy_tls = match (proxy_files, file.k8s_proxy.plaintext) {
        (Some(_), true) => {
            errors.push("k8s_proxy: set either tls or plaintext, not both".into());
            ProxyTls::Plaintext
        }
        (Some(f), false) => ProxyTls::Files(f),
        (None, true) => ProxyTls::Plaintext,
        (None, false) => ProxyTls::Generated,
    };
    let k8s_proxy_url = cli.k8s_proxy_url.clone().or(file.k8s_proxy.url.clone());
    if let Some(u) = &k8s_proxy_url {
        match u.parse::<http::Uri>() {
            Ok(uri)
                if uri.host().is_some() && matches!(uri.scheme_str(), Some("http" | "https")) =>
            {
                let tls = k8s_proxy_tls != ProxyTls::Plaintext;
                if tls && uri.scheme_str() == Some("http") {
                    errors.push(format!(
                        "k8s proxy URL `{u}` is http but the proxy serves TLS; use https"
                    ));
                }
            }
            _ => errors.push(format!(
                "k8s proxy URL `{u}` is not an absolute http(s) URL"
            )),
        }
    }
    let agent_wait_timeout = limits::duration_setting(
        "k8s_proxy.agent_wait_timeout",
        &file.k8s_proxy.agent_wait_timeout,
        Duration::from_secs(20),
        Duration::ZERO,
        errors,
    );
    ProxySettings {
        agent_tls,
        k8s_proxy_tls,
        k8s_proxy_url,
        agent_wait_timeout,
    }
}

/// Settings of several replicas sharing a Redis (None: a single kas).
fn shared_settings(
    cli: &Cli,
    file: &FileConfig,
    listen_private: SocketAddr,
    errors: &mut Vec<String>,
) -> Option<SharedConfig> {
    let url = cli.redis_url.clone().or(file.redis.url.clone())?;
    if !(url.starts_with("redis://") || url.starts_with("unix://")) {
        errors.push(format!(
            "redis.url `{}` must start with redis:// (or unix:// for a socket)",
            mask_url(&url)
        ));
    }
    let expiry = limits::duration_setting(
        "redis.expiry",
        &file.redis.expiry,
        Duration::from_secs(60),
        Duration::from_secs(1),
        errors,
    );
    let secret = match &file.private.secret_file {
        None => {
            errors.push("private.secret_file is required with redis.url: the kas replicas authenticate each other with it".into());
            Vec::new()
        }
        Some(p) => read_secret("private.secret_file", p, errors),
    };
    let private_url = cli.private_url.clone().or(file.private.url.clone());
    match &private_url {
        Some(u) if !u.starts_with("http://") => errors.push(format!(
            "private.url `{u}` must be an http:// URL (the private API is plain HTTP/2 on a private network)"
        )),
        None if listen_private.ip().is_unspecified() => errors.push(
            "private.url is required when the private listener binds all interfaces: other replicas need an address they can reach".into(),
        ),
        _ => {}
    }
    Some(SharedConfig {
        redis_url: url,
        key_prefix: file
            .redis
            .key_prefix
            .clone()
            .unwrap_or_else(|| "kas".into()),
        expiry,
        private_url,
        secret,
    })
}

/// The application API (None: off without a secret).
fn application_settings(
    cli: &Cli,
    file: &FileConfig,
    errors: &mut Vec<String>,
) -> Option<ApplicationConfig> {
    let application = cli
        .application_secret_file
        .clone()
        .or(file.application.secret_file.clone())
        .map(|p| ApplicationConfig {
            secret: read_secret("application.secret_file", &p, errors),
            integration_log_file: file.application.integration_log_file.clone(),
        });
    if application.is_none() && file.application.integration_log_file.is_some() {
        errors.push("application.integration_log_file needs application.secret_file (the application API is off without it)".into());
    }
    application
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::load(&Cli::default()).expect("valid");
        assert_eq!(c.listen_agent.port(), 8150);
        assert_eq!(c.k8s_proxy_tls, ProxyTls::Generated);
        assert_eq!(c.agent_wait_timeout, Duration::from_secs(20));
    }

    #[test]
    fn reports_every_problem_at_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("kas.yaml");
        std::fs::write(
            &f,
            "listen:\n  agent: nope\n  api: 127.0.0.1:9000\nk8s_proxy:\n  agent_wait_timeout: 5 parsecs\n  tls:\n    certificate_file: /missing.crt\n    key_file: /missing.key\n    ca_file: /missing-ca.crt\n",
        )
        .expect("write");
        let cli = Cli {
            config: Some(f),
            listen_k8s_proxy: Some("127.0.0.1:9000".into()),
            k8s_proxy_url: Some("not a url".into()),
            ..Default::default()
        };
        let errs = Config::load(&cli).expect_err("invalid");
        let all = errs.join("\n");
        for needle in [
            "`nope`",
            "both use 127.0.0.1:9000",
            "agent_wait_timeout",
            "/missing.crt",
            "/missing.key",
            "/missing-ca.crt",
            "not a url",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("kas.yaml");
        std::fs::write(&f, "listen:\n  agnet: 1.2.3.4:5\n").expect("write");
        let errs = Config::load(&Cli {
            config: Some(f),
            ..Default::default()
        })
        .expect_err("invalid");
        assert!(errs[0].contains("agnet"), "{errs:?}");
    }

    #[test]
    fn shared_settings_are_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("kas.yaml");
        let short = dir.path().join("short-secret");
        std::fs::write(&short, "too short").expect("write");
        std::fs::write(
            &f,
            format!(
                "redis:\n  url: http://wrong\n  expiry: 0s\nprivate:\n  secret_file: {}\ncontrolplane:\n  url: mysql://x\n",
                short.display()
            ),
        )
        .expect("write");
        let errs = Config::load(&Cli {
            config: Some(f),
            ..Default::default()
        })
        .expect_err("invalid")
        .join("\n");
        for needle in [
            "redis.url",
            "redis.expiry",
            "at least 32 bytes",
            "controlplane.url",
        ] {
            assert!(errs.contains(needle), "missing {needle} in:\n{errs}");
        }
        let errs = Config::load(&Cli {
            redis_url: Some("redis://127.0.0.1:1/".into()),
            ..Default::default()
        })
        .expect_err("no secret")
        .join("\n");
        assert!(errs.contains("private.secret_file is required"), "{errs}");
    }

    #[test]
    fn connection_limits_and_agent_settings() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("kas.yaml");
        std::fs::write(
            &f,
            "connections:\n  k8s_proxy: {max: \"500\", idle_timeout: 30s}\n  api: {max: 7, first_request_timeout: 2s}\nagent:\n  max_connection_age: 0s\n  handshake_timeout: 3s\n  connections_per_token_per_minute: 9\n",
        )
        .expect("write");
        let c = Config::load(&Cli {
            config: Some(f.clone()),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(c.limits.k8s_proxy.max_connections, 500);
        assert_eq!(c.limits.k8s_proxy.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.limits.api.max_connections, 7);
        assert_eq!(c.limits.api.first_request_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.agent.max_age, None, "0s: never");
        assert_eq!(c.limits.agent.max_connections, 20_000);
        assert_eq!(c.agent.handshake_timeout, Duration::from_secs(3));
        assert_eq!(c.agent.connections_per_token_per_minute, 9);
        let d = Config::load(&Cli::default()).expect("defaults");
        let age = d.limits.agent.max_age.expect("a default max age");
        assert_eq!(age.age, Duration::from_secs(7200));
        assert_eq!(d.agent.connections_per_token_per_minute, 40_000);

        std::fs::write(
            &f,
            "connections:\n  api: {max: 0}\n  agent: {max: lots, idle_timeout: soon}\n  bogus: {}\n",
        )
        .expect("write");
        let errs = Config::load(&Cli {
            config: Some(f.clone()),
            ..Default::default()
        })
        .expect_err("invalid")
        .join("\n");
        assert!(errs.contains("bogus"), "{errs}");
        std::fs::write(
            &f,
            "connections:\n  api: {max: 0}\n  agent: {max: lots, idle_timeout: soon}\n",
        )
        .expect("write");
        let errs = Config::load(&Cli {
            config: Some(f),
            ..Default::default()
        })
        .expect_err("invalid")
        .join("\n");
        for needle in [
            "connections.api.max",
            "connections.agent.max",
            "connections.agent.idle_timeout",
        ] {
            assert!(errs.contains(needle), "missing {needle} in {errs}");
        }
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_url("postgres://kas:hunter2@db:5432/kas"),
            "postgres://kas:***@db:5432/kas"
        );
        assert_eq!(
            mask_url("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("x").is_err());
    }
}
