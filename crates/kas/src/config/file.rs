//! The configuration file's shape: what `--config` may hold, parsed strictly (an unknown
//! key is an error that names it). Values are checked in the parent module.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Reads and parses the file; an empty file is the defaults.
pub(super) fn read(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    let de = serde_yaml_ng::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        // The YAML error may name the field itself already.
        let (at, inner) = (e.path().to_string(), e.inner().to_string());
        let message = if inner.starts_with(&at) {
            inner
        } else {
            format!("{at}: {inner}")
        };
        format!("config file {}: {message}", path.display())
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) data_dir: Option<PathBuf>,
    #[serde(default)]
    pub(super) listen: FileListen,
    #[serde(default)]
    pub(super) agent: FileAgent,
    #[serde(default)]
    pub(super) k8s_proxy: FileK8sProxy,
    #[serde(default)]
    pub(super) redis: FileRedis,
    #[serde(default)]
    pub(super) private: FilePrivate,
    #[serde(default)]
    pub(super) controlplane: FileControlPlane,
    #[serde(default)]
    pub(super) application: FileApplication,
    #[serde(default)]
    pub(super) audit: FileAudit,
    #[serde(default)]
    pub(super) connections: FileConnections,
}

/// Connection limits per listener (`connections.<listener>`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConnections {
    pub(super) agent: Option<FileLimits>,
    pub(super) k8s_proxy: Option<FileLimits>,
    pub(super) api: Option<FileLimits>,
    pub(super) observability: Option<FileLimits>,
    pub(super) private: Option<FileLimits>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLimits {
    /// Connections open at once (a number, or a string of digits as `--set-string` and
    /// quoting give).
    pub(super) max: Option<Count>,
    pub(super) first_request_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) handshake_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAudit {
    /// A path, or `-` for stdout.
    pub(super) file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileApplication {
    /// File with the secret that signs the application's JWTs.
    pub(super) secret_file: Option<PathBuf>,
    /// JSON-lines file for the Kubernetes integration log (besides the `k8s_integration` log target).
    pub(super) integration_log_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRedis {
    pub(super) url: Option<String>,
    pub(super) key_prefix: Option<String>,
    /// How long a registry entry lives without refresh (default 60s).
    pub(super) expiry: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePrivate {
    pub(super) url: Option<String>,
    /// File holding the secret (at least 32 bytes) shared only by the kas replicas.
    pub(super) secret_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileControlPlane {
    pub(super) url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListen {
    pub(super) agent: Option<String>,
    pub(super) api: Option<String>,
    pub(super) k8s_proxy: Option<String>,
    pub(super) observability: Option<String>,
    pub(super) private: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAgent {
    pub(super) tls: Option<FileTls>,
    /// Connections older than this are asked to reconnect (default 2h; 0s: never).
    pub(super) max_connection_age: Option<String>,
    /// How long such a connection may finish its requests (default 5m).
    pub(super) max_connection_age_grace: Option<String>,
    /// Time for an agent's first message on a new stream (default 10s).
    pub(super) handshake_timeout: Option<String>,
    /// HTTP/2 pings to agents: every `keepalive_interval` without traffic, and a peer
    /// that does not answer within `keepalive_timeout` is dropped.
    pub(super) keepalive_interval: Option<String>,
    pub(super) keepalive_timeout: Option<String>,
    /// New streams (configuration and tunnels) per agent token and minute, counted
    /// across replicas through Redis when configured (default 40000; 0: no limit).
    pub(super) connections_per_token_per_minute: Option<u32>,
    /// Most `ci_access.projects` entries an agent's configuration may have (default 100).
    pub(super) max_ci_access_projects: Option<Count>,
    /// Most `ci_access.groups` entries (default 100).
    pub(super) max_ci_access_groups: Option<Count>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileK8sProxy {
    pub(super) url: Option<String>,
    pub(super) tls: Option<FileTls>,
    /// Serve plain HTTP (only behind a TLS-terminating ingress: kubectl sends tokens only over TLS).
    #[serde(default)]
    pub(super) plaintext: bool,
    pub(super) agent_wait_timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    pub(super) certificate_file: PathBuf,
    pub(super) key_file: PathBuf,
    /// The CA that signed `certificate_file`, handed to clients (job kubeconfigs).
    pub(super) ca_file: Option<PathBuf>,
}

/// A whole number written as a number or as a string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum Count {
    Number(u64),
    Text(String),
}

impl Count {
    pub(super) fn value(&self) -> Option<usize> {
        match self {
            Count::Number(n) => usize::try_from(*n).ok(),
            Count::Text(t) => t.trim().parse().ok(),
        }
    }
}
