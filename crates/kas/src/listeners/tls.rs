//! TLS material: loading PEM files, and the CA plus serving certificate kas generates
//! in its data dir for the Kubernetes API proxy when none is configured.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, SanType,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: no certificate found in the PEM file")]
    NoCertificate(PathBuf),
    #[error("{0}: no private key found in the PEM file")]
    NoKey(PathBuf),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration is invalid: {0}")]
    Rustls(#[from] rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a private key (or anything secret): readable by the owner only.
fn write_private(path: &Path, data: &str) -> Result<(), TlsError> {
    write_with_mode(path, data, 0o600)
}

/// Writes a certificate: public, so users and tools can read it.
fn write_public(path: &Path, data: &str) -> Result<(), TlsError> {
    write_with_mode(path, data, 0o644)
}

fn write_with_mode(path: &Path, data: &str, mode: u32) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
        let mut f = opts.open(&tmp).map_err(io)?;
        f.write_all(data.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    // Rename so a crash never leaves a half-written key behind.
    std::fs::rename(&tmp, path).map_err(io)
}

/// PEM certificate chain and key, as loaded or generated.
#[derive(Clone)]
pub struct CertifiedKeyPem {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKeyPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKeyPem")
            .field("key_pem", &"****")
            .finish_non_exhaustive()
    }
}

/// A PEM file as text.
pub fn read_pem_text(path: &Path) -> Result<String, TlsError> {
    Ok(String::from_utf8_lossy(&read(path)?).into_owned())
}

/// Loads a certificate chain and key from PEM files.
pub fn load_pem(cert: &Path, key: &Path) -> Result<CertifiedKeyPem, TlsError> {
    let cert_pem = String::from_utf8_lossy(&read(cert)?).into_owned();
    let key_pem = String::from_utf8_lossy(&read(key)?).into_owned();
    Ok(CertifiedKeyPem { cert_pem, key_pem })
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kas k8s-proxy CA");
    dn.push(DnType::OrganizationName, "kas");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2049, 1, 1);
    p
}

/// The generated CA and serving certificate of the Kubernetes API proxy.
pub struct GeneratedTls {
    pub ca_pem: String,
    pub ca_file: PathBuf,
    pub serving: CertifiedKeyPem,
}

/// Loads the proxy CA from `dir` (creating it on first start) and a serving
/// certificate covering `hosts`, re-issued from the same CA when the host list changes,
/// so kubeconfigs handed out earlier stay valid.
pub fn generated_proxy_tls(dir: &Path, hosts: &[String]) -> Result<GeneratedTls, TlsError> {
    let ca_file = dir.join("k8s-proxy-ca.crt");
    let ca_key_file = dir.join("k8s-proxy-ca.key");
    let (ca_pem, ca_key) = if ca_file.is_file() && ca_key_file.is_file() {
        let key_pem = String::from_utf8_lossy(&read(&ca_key_file)?).into_owned();
        let key = KeyPair::from_pem(&key_pem)?;
        (String::from_utf8_lossy(&read(&ca_file)?).into_owned(), key)
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        write_private(&ca_key_file, &key.serialize_pem())?;
        write_public(&ca_file, &cert.pem())?;
        (cert.pem(), key)
    };
    // Same subject and key as the stored CA certificate, so what it signs chains to it.
    let issuer = ca_params().self_signed(&ca_key)?;

    let cert_file = dir.join("k8s-proxy.crt");
    let key_file = dir.join("k8s-proxy.key");
    let hosts_file = dir.join("k8s-proxy.hosts");
    let wanted = hosts.join("\n");
    let current = std::fs::read_to_string(&hosts_file).unwrap_or_default();
    if current == wanted && cert_file.is_file() && key_file.is_file() {
        return Ok(GeneratedTls {
            ca_pem,
            ca_file,
            serving: load_pem(&cert_file, &key_file)?,
        });
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kas k8s-proxy");
    params.distinguished_name = dn;
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2049, 1, 1);
    for h in hosts {
        params
            .subject_alt_names
            .push(match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(h.clone().try_into()?),
            });
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer, &ca_key)?;
    let serving = CertifiedKeyPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    write_private(&key_file, &serving.key_pem)?;
    write_public(&cert_file, &serving.cert_pem)?;
    write_public(&hosts_file, &wanted)?;
    Ok(GeneratedTls {
        ca_pem,
        ca_file,
        serving,
    })
}

/// A rustls server configuration offering HTTP/2 and HTTP/1.1.
pub fn server_config(pem: &CertifiedKeyPem) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    config_with_alpn(pem, &[b"h2", b"http/1.1"])
}

/// A rustls server configuration for gRPC: HTTP/2 only.
pub fn grpc_server_config(pem: &CertifiedKeyPem) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    config_with_alpn(pem, &[b"h2"])
}

fn config_with_alpn(
    pem: &CertifiedKeyPem,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Io {
            path: PathBuf::from("<certificate>"),
            source: e,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(PathBuf::from("<certificate>")));
    }
    let key = rustls_pemfile::private_key(&mut pem.key_pem.as_bytes())
        .map_err(|e| TlsError::Io {
            path: PathBuf::from("<key>"),
            source: e,
        })?
        .ok_or_else(|| TlsError::NoKey(PathBuf::from("<key>")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_reused_and_serving_cert_reissued_for_new_hosts() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = generated_proxy_tls(dir.path(), &["localhost".into(), "127.0.0.1".into()])
            .expect("gen");
        let b = generated_proxy_tls(dir.path(), &["localhost".into(), "127.0.0.1".into()])
            .expect("gen");
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(a.serving.cert_pem, b.serving.cert_pem);
        let c = generated_proxy_tls(dir.path(), &["kas.example.com".into()]).expect("gen");
        assert_eq!(a.ca_pem, c.ca_pem);
        assert_ne!(a.serving.cert_pem, c.serving.cert_pem);
        server_config(&c.serving).expect("usable");
    }
}
