//! kas configuration: a YAML file, environment variables and flags (flags win over
//! the environment, which wins over the file). Every problem is reported at once,
//! before anything is bound.

use crate::listeners::{Limits, MaxAge};
use serde::Deserialize;
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
    /// Runtime threads: 0 (default) uses one per core; 1 runs everything on one thread.
    #[arg(long, env = "KAS_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
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
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    #[serde(default)]
    listen: FileListen,
    #[serde(default)]
    agent: FileAgent,
    #[serde(default)]
    k8s_proxy: FileK8sProxy,
    #[serde(default)]
    redis: FileRedis,
    #[serde(default)]
    private: FilePrivate,
    #[serde(default)]
    controlplane: FileControlPlane,
    #[serde(default)]
    application: FileApplication,
    #[serde(default)]
    audit: FileAudit,
    #[serde(default)]
    connections: FileConnections,
}

/// Connection limits per listener (`connections.<listener>`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConnections {
    agent: Option<FileLimits>,
    k8s_proxy: Option<FileLimits>,
    api: Option<FileLimits>,
    observability: Option<FileLimits>,
    private: Option<FileLimits>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    /// Connections open at once (a number, or a string of digits as `--set-string` and
    /// quoting give).
    max: Option<Count>,
    first_request_timeout: Option<String>,
    idle_timeout: Option<String>,
    handshake_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAudit {
    /// A path, or `-` for stdout.
    file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileApplication {
    /// File with the secret that signs the application's JWTs.
    secret_file: Option<PathBuf>,
    /// JSON-lines file for the Kubernetes integration log (besides the `k8s_integration` log target).
    integration_log_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRedis {
    url: Option<String>,
    key_prefix: Option<String>,
    /// How long a registry entry lives without refresh (default 60s).
    expiry: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePrivate {
    url: Option<String>,
    /// File holding the secret (at least 32 bytes) shared only by the kas replicas.
    secret_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileControlPlane {
    url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListen {
    agent: Option<String>,
    api: Option<String>,
    k8s_proxy: Option<String>,
    observability: Option<String>,
    private: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAgent {
    tls: Option<FileTls>,
    /// Connections older than this are asked to reconnect (default 2h; 0s: never).
    max_connection_age: Option<String>,
    /// How long such a connection may finish its requests (default 5m).
    max_connection_age_grace: Option<String>,
    /// Time for an agent's first message on a new stream (default 10s).
    handshake_timeout: Option<String>,
    /// HTTP/2 pings to agents: every `keepalive_interval` without traffic, and a peer
    /// that does not answer within `keepalive_timeout` is dropped.
    keepalive_interval: Option<String>,
    keepalive_timeout: Option<String>,
    /// New streams (configuration and tunnels) per agent token and minute, counted
    /// across replicas through Redis when configured (default 40000; 0: no limit).
    connections_per_token_per_minute: Option<u32>,
    /// Most `ci_access.projects` entries an agent's configuration may have (default 100).
    max_ci_access_projects: Option<Count>,
    /// Most `ci_access.groups` entries (default 100).
    max_ci_access_groups: Option<Count>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileK8sProxy {
    url: Option<String>,
    tls: Option<FileTls>,
    /// Serve plain HTTP (only behind a TLS-terminating ingress: kubectl sends tokens only over TLS).
    #[serde(default)]
    plaintext: bool,
    agent_wait_timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    certificate_file: PathBuf,
    key_file: PathBuf,
    /// The CA that signed `certificate_file`, handed to clients (job kubeconfigs).
    ca_file: Option<PathBuf>,
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
}

/// Connection limits of every listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerLimits {
    pub agent: Limits,
    pub k8s_proxy: Limits,
    pub api: Limits,
    pub observability: Limits,
    pub private: Limits,
}

/// Settings of agent connections beyond the listener's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// Time for the first message of a configuration stream or tunnel.
    pub handshake_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// New streams per token and minute (0: unlimited).
    pub connections_per_token_per_minute: u32,
    /// Limits on the `ci_access` entries of agents' configurations.
    pub ci_access_limits: kas_authz::CiAccessLimits,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            keepalive_timeout: Duration::from_secs(10),
            connections_per_token_per_minute: 40_000,
            ci_access_limits: kas_authz::CiAccessLimits::default(),
        }
    }
}

impl Default for ListenerLimits {
    /// Sized for 15,000 agents (one connection per agent replica) on one kas.
    fn default() -> Self {
        let l = |max, idle| Limits {
            max_connections: max,
            handshake_timeout: Duration::from_secs(10),
            first_request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(idle),
            max_age: None,
        };
        let mut agent = l(20_000, 60);
        agent.max_age = Some(MaxAge {
            age: Duration::from_secs(2 * 3600),
            grace: Duration::from_secs(300),
        });
        ListenerLimits {
            agent,
            k8s_proxy: l(10_000, 120),
            api: l(1_000, 60),
            observability: l(256, 60),
            private: l(4_096, 300),
        }
    }
}

impl ListenerLimits {
    /// Every connection the listeners may hold at once.
    pub fn total(&self) -> usize {
        [
            &self.agent,
            &self.k8s_proxy,
            &self.api,
            &self.observability,
            &self.private,
        ]
        .iter()
        .map(|l| l.max_connections)
        .sum()
    }
}

/// A whole number written as a number or as a string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Count {
    Number(u64),
    Text(String),
}

impl Count {
    fn value(&self) -> Option<usize> {
        match self {
            Count::Number(n) => usize::try_from(*n).ok(),
            Count::Text(t) => t.trim().parse().ok(),
        }
    }
}

/// A count setting of at least 1: `default` when absent, the problem recorded when invalid.
fn count_setting(
    name: &str,
    value: &Option<Count>,
    default: usize,
    errors: &mut Vec<String>,
) -> usize {
    match value.as_ref().map(|c| (c, c.value())) {
        None => default,
        Some((_, Some(n))) if n > 0 => n,
        Some((c, _)) => {
            errors.push(format!(
                "{name} must be a whole number of at least 1, not {c:?}"
            ));
            default
        }
    }
}

/// A duration setting: `default` when absent, the problem recorded when invalid.
fn duration_setting(
    name: &str,
    value: &Option<String>,
    default: Duration,
    min: Duration,
    errors: &mut Vec<String>,
) -> Duration {
    match value.as_deref().map(parse_duration) {
        None => default,
        Some(Ok(d)) if d >= min => d,
        Some(Ok(_)) => {
            errors.push(format!("{name} must be at least {min:?}"));
            default
        }
        Some(Err(e)) => {
            errors.push(format!("{name}: {e}"));
            default
        }
    }
}

/// Applies `connections.<name>` over `limits`.
fn apply_limits(
    name: &str,
    file: &Option<FileLimits>,
    limits: &mut Limits,
    errors: &mut Vec<String>,
) {
    let Some(f) = file else { return };
    let key = |k: &str| format!("connections.{name}.{k}");
    limits.max_connections = count_setting(&key("max"), &f.max, limits.max_connections, errors);
    let ms = Duration::from_millis(1);
    limits.first_request_timeout = duration_setting(
        &key("first_request_timeout"),
        &f.first_request_timeout,
        limits.first_request_timeout,
        ms,
        errors,
    );
    limits.idle_timeout = duration_setting(
        &key("idle_timeout"),
        &f.idle_timeout,
        limits.idle_timeout,
        ms,
        errors,
    );
    limits.handshake_timeout = duration_setting(
        &key("handshake_timeout"),
        &f.handshake_timeout,
        limits.handshake_timeout,
        ms,
        errors,
    );
}

/// The listeners' limits and the agent settings from the file.
fn connection_settings(
    file: &FileConfig,
    errors: &mut Vec<String>,
) -> (ListenerLimits, AgentSettings) {
    let mut limits = ListenerLimits::default();
    let c = &file.connections;
    apply_limits("agent", &c.agent, &mut limits.agent, errors);
    apply_limits("k8s_proxy", &c.k8s_proxy, &mut limits.k8s_proxy, errors);
    apply_limits("api", &c.api, &mut limits.api, errors);
    apply_limits(
        "observability",
        &c.observability,
        &mut limits.observability,
        errors,
    );
    apply_limits("private", &c.private, &mut limits.private, errors);
    let a = &file.agent;
    let d = AgentSettings::default();
    let ms = Duration::from_millis(1);
    let default_age = limits.agent.max_age.unwrap_or(MaxAge {
        age: Duration::from_secs(2 * 3600),
        grace: Duration::from_secs(300),
    });
    let age = duration_setting(
        "agent.max_connection_age",
        &a.max_connection_age,
        default_age.age,
        Duration::ZERO,
        errors,
    );
    let grace = duration_setting(
        "agent.max_connection_age_grace",
        &a.max_connection_age_grace,
        default_age.grace,
        Duration::ZERO,
        errors,
    );
    limits.agent.max_age = (!age.is_zero()).then_some(MaxAge { age, grace });
    let settings = AgentSettings {
        handshake_timeout: duration_setting(
            "agent.handshake_timeout",
            &a.handshake_timeout,
            d.handshake_timeout,
            ms,
            errors,
        ),
        keepalive_interval: duration_setting(
            "agent.keepalive_interval",
            &a.keepalive_interval,
            d.keepalive_interval,
            Duration::from_secs(1),
            errors,
        ),
        keepalive_timeout: duration_setting(
            "agent.keepalive_timeout",
            &a.keepalive_timeout,
            d.keepalive_timeout,
            Duration::from_secs(1),
            errors,
        ),
        connections_per_token_per_minute: a
            .connections_per_token_per_minute
            .unwrap_or(d.connections_per_token_per_minute),
        ci_access_limits: kas_authz::CiAccessLimits {
            max_projects: count_setting(
                "agent.max_ci_access_projects",
                &a.max_ci_access_projects,
                d.ci_access_limits.max_projects,
                errors,
            ),
            max_groups: count_setting(
                "agent.max_ci_access_groups",
                &a.max_ci_access_groups,
                d.ci_access_limits.max_groups,
                errors,
            ),
        },
    };
    (limits, settings)
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

/// Parses `20s`, `500ms`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("`{s}` has no unit (use ms, s, m or h)"))?;
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("`{s}` has an unknown unit (use ms, s, m or h)")),
    })
}

impl Config {
    /// Builds the configuration from flags/environment and the optional file,
    /// returning every problem found.
    pub fn load(cli: &Cli) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        let file: FileConfig = match &cli.config {
            None => FileConfig::default(),
            Some(p) => match std::fs::read_to_string(p) {
                Err(e) => {
                    errors.push(format!("config file {}: {e}", p.display()));
                    FileConfig::default()
                }
                Ok(text) if text.trim().is_empty() => FileConfig::default(),
                Ok(text) => {
                    let de = serde_yaml_ng::Deserializer::from_str(&text);
                    match serde_path_to_error::deserialize(de) {
                        Ok(f) => f,
                        Err(e) => {
                            // The YAML error may name the field itself already.
                            let (path, inner) = (e.path().to_string(), e.inner().to_string());
                            let message = if inner.starts_with(&path) {
                                inner
                            } else {
                                format!("{path}: {inner}")
                            };
                            errors.push(format!("config file {}: {message}", p.display()));
                            FileConfig::default()
                        }
                    }
                }
            },
        };
        let mut addr = |name: &str, flag: &Option<String>, file: &Option<String>, default: &str| {
            let v = flag
                .clone()
                .or_else(|| file.clone())
                .unwrap_or_else(|| default.to_string());
            match v.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    errors.push(format!(
                        "listen address for {name} `{v}` is not host:port (e.g. 127.0.0.1:8150)"
                    ));
                    SocketAddr::from(([127, 0, 0, 1], 0))
                }
            }
        };
        let listen_agent = addr(
            "agent",
            &cli.listen_agent,
            &file.listen.agent,
            "127.0.0.1:8150",
        );
        let listen_api = addr("api", &cli.listen_api, &file.listen.api, "127.0.0.1:8153");
        let listen_k8s_proxy = addr(
            "k8s_proxy",
            &cli.listen_k8s_proxy,
            &file.listen.k8s_proxy,
            "127.0.0.1:8154",
        );
        let listen_observability = addr(
            "observability",
            &cli.listen_observability,
            &file.listen.observability,
            "127.0.0.1:8151",
        );
        let listen_private = addr(
            "private",
            &cli.listen_private,
            &file.listen.private,
            "127.0.0.1:8155",
        );
        let all = [
            ("private", listen_private),
            ("agent", listen_agent),
            ("api", listen_api),
            ("k8s_proxy", listen_k8s_proxy),
            ("observability", listen_observability),
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
        let mut tls_files = |what: &str, t: &Option<FileTls>| {
            t.as_ref().map(|t| {
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
                TlsFiles {
                    certificate_file: t.certificate_file.clone(),
                    key_file: t.key_file.clone(),
                    ca_file: t.ca_file.clone(),
                }
            })
        };
        let agent_tls = tls_files("agent", &file.agent.tls);
        let proxy_files = tls_files("k8s_proxy", &file.k8s_proxy.tls);
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
                    if uri.host().is_some()
                        && matches!(uri.scheme_str(), Some("http" | "https")) =>
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
        let agent_wait_timeout = match &file.k8s_proxy.agent_wait_timeout {
            None => Duration::from_secs(20),
            Some(s) => parse_duration(s).unwrap_or_else(|e| {
                errors.push(format!("k8s_proxy.agent_wait_timeout: {e}"));
                Duration::from_secs(20)
            }),
        };
        if !matches!(cli.log_format.as_str(), "text" | "json") {
            errors.push(format!(
                "--log-format must be text or json, not `{}`",
                cli.log_format
            ));
        }
        let redis_url = cli.redis_url.clone().or(file.redis.url.clone());
        let shared = redis_url.map(|url| {
            if !(url.starts_with("redis://") || url.starts_with("unix://")) {
                errors.push(format!(
                    "redis.url `{}` must start with redis:// (or unix:// for a socket)",
                    mask_url(&url)
                ));
            }
            let expiry = match &file.redis.expiry {
                None => Duration::from_secs(60),
                Some(s) => match parse_duration(s) {
                    Ok(d) if d >= Duration::from_secs(1) => d,
                    Ok(_) => {
                        errors.push("redis.expiry must be at least 1s".into());
                        Duration::from_secs(60)
                    }
                    Err(e) => {
                        errors.push(format!("redis.expiry: {e}"));
                        Duration::from_secs(60)
                    }
                },
            };
            let secret = match &file.private.secret_file {
                None => {
                    errors.push("private.secret_file is required with redis.url: the kas replicas authenticate each other with it".into());
                    Vec::new()
                }
                Some(p) => read_secret("private.secret_file", p, &mut errors),
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
            SharedConfig {
                redis_url: url,
                key_prefix: file.redis.key_prefix.clone().unwrap_or_else(|| "kas".into()),
                expiry,
                private_url,
                secret,
            }
        });
        let application = cli
            .application_secret_file
            .clone()
            .or(file.application.secret_file.clone())
            .map(|p| ApplicationConfig {
                secret: read_secret("application.secret_file", &p, &mut errors),
                integration_log_file: file.application.integration_log_file.clone(),
            });
        if application.is_none() && file.application.integration_log_file.is_some() {
            errors.push("application.integration_log_file needs application.secret_file (the application API is off without it)".into());
        }
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
        let (limits, agent) = connection_settings(&file, &mut errors);
        if errors.is_empty() {
            Ok(Config {
                data_dir,
                listen_agent,
                listen_api,
                listen_k8s_proxy,
                listen_observability,
                agent_tls,
                k8s_proxy_tls,
                k8s_proxy_url,
                agent_wait_timeout,
                listen_private,
                shared,
                controlplane_url,
                application,
                audit,
                limits,
                agent,
            })
        } else {
            Err(errors)
        }
    }
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
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("x").is_err());
    }
}
