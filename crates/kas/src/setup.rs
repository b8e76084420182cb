//! What kas prepares before it serves: its data dir (owner-only), the admin token, the
//! open-file limit, the control plane and the proxy's TLS.

use crate::config::{self, Config, ProxyTls};
use crate::listeners::tls;
use crate::StartError;
use kas_controlplane::{
    CachingControlPlane, ControlPlane, PostgresControlPlane, SqliteControlPlane,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The admin token's hash: the token is read from `<data dir>/admin-token`, or made
/// and written there (0600) on first start.
pub(crate) fn admin_token(data_dir: &Path) -> Result<[u8; 32], StartError> {
    let path = data_dir.join("admin-token");
    let err = |source| StartError::DataDir {
        path: path.clone(),
        source,
    };
    let token = match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            let t = kas_controlplane::new_token(kas_controlplane::TokenKind::Admin);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            use std::io::Write;
            let mut f = opts.open(&path).map_err(err)?;
            f.write_all(format!("{}\n", t.expose()).as_bytes())
                .map_err(err)?;
            t.expose().to_string()
        }
    };
    Ok(kas_controlplane::hash_token(&token))
}

/// Names the generated proxy certificate is valid for.
fn host_list(addr: SocketAddr, url: Option<&str>) -> Vec<String> {
    let mut hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !addr.ip().is_unspecified() {
        hosts.push(addr.ip().to_string());
    }
    if let Some(h) = url
        .and_then(|u| u.parse::<http::Uri>().ok())
        .and_then(|u| u.host().map(str::to_string))
    {
        hosts.push(h.trim_start_matches('[').trim_end_matches(']').to_string());
    }
    if let Ok(h) = std::env::var("HOSTNAME") {
        if !h.is_empty() {
            hosts.push(h);
        }
    }
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|h| seen.insert(h.clone()));
    hosts
}

/// Creates the data dir (0700) or tightens an existing one's permissions: it holds the
/// control plane, the admin token and generated keys.
pub(crate) fn prepare_data_dir(dir: &Path) -> Result<(), StartError> {
    let err = |source| StartError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Creates `path` empty with mode 0600 unless it exists.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path).map(drop)
}

/// Makes every file kas keeps in the data dir readable by its owner only (SQLite
/// creates its files with the process umask).
fn restrict_data_files(dir: &Path) -> Result<(), StartError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let entries = std::fs::read_dir(dir).map_err(|source| StartError::DataDir {
            path: dir.to_path_buf(),
            source,
        })?;
        for e in entries.flatten() {
            let path = e.path();
            if path.is_file() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|source| StartError::DataDir { path, source })?;
            }
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit (15,000 agents need as many
/// descriptors), and warns when the listeners' caps exceed what is left.
pub(crate) fn raise_file_limit(limits: &config::ListenerLimits) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => {
            let wanted = limits.total() as u64;
            if n < wanted {
                tracing::warn!(
                    open_files = n,
                    connection_caps = wanted,
                    "the open-file limit is below the listeners' connection caps; connections beyond it wait until others close (raise `ulimit -n` or lower connections.*.max)"
                );
            } else {
                tracing::debug!(open_files = n, "open-file limit");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

pub(crate) async fn open_control_plane(
    config: &Config,
) -> Result<Arc<dyn ControlPlane>, StartError> {
    Ok(match &config.controlplane_url {
        Some(url) => {
            let pg = PostgresControlPlane::connect(url).await?;
            Arc::new(CachingControlPlane::new(pg))
        }
        None => {
            let path = config.data_dir.join("controlplane.sqlite");
            // SQLite gives its -wal and -shm files the database file's permissions.
            create_private_file(&path).map_err(|source| StartError::DataDir {
                path: path.clone(),
                source,
            })?;
            let cp = Arc::new(CachingControlPlane::new(SqliteControlPlane::open(&path)?));
            restrict_data_files(&config.data_dir)?;
            cp
        }
    })
}

/// The proxy's TLS settings and the CA to hand to clients (PEM text and file).
pub(crate) type ProxyTlsSetup = (Option<Arc<rustls::ServerConfig>>, Option<(String, PathBuf)>);

pub(crate) fn proxy_tls(
    config: &Config,
    proxy_addr: SocketAddr,
) -> Result<ProxyTlsSetup, StartError> {
    Ok(match &config.k8s_proxy_tls {
        ProxyTls::Plaintext => (None, None),
        ProxyTls::Files(f) => {
            let pem = tls::load_pem(&f.certificate_file, &f.key_file)?;
            let ca = match &f.ca_file {
                Some(p) => Some((tls::read_pem_text(p)?, p.clone())),
                None => None,
            };
            (Some(tls::server_config(&pem)?), ca)
        }
        ProxyTls::Generated => {
            let g = tls::generated_proxy_tls(
                &config.data_dir,
                &host_list(proxy_addr, config.k8s_proxy_url.as_deref()),
            )?;
            restrict_data_files(&config.data_dir)?;
            (
                Some(tls::server_config(&g.serving)?),
                Some((g.ca_pem, g.ca_file)),
            )
        }
    })
}

/// The proxy URL handed to jobs when none is configured.
pub(crate) fn default_proxy_url(tls: bool, addr: SocketAddr) -> String {
    let scheme = if tls { "https" } else { "http" };
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    format!("{scheme}://{host}:{}/k8s-proxy/", addr.port())
}
