//! How agentk reaches kas: directly or through a corporate HTTP proxy (`CONNECT`,
//! chosen from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` as Go programs choose it, with
//! basic credentials from the proxy URL), then TLS for `grpcs://` (the system's CAs and
//! `--ca-cert`, an optional server name to verify, or, loudly, no verification).
//!
//! It returns a byte stream for tonic to speak HTTP/2 over; it knows nothing of gRPC.

use base64::Engine;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why kas could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connecting to {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("proxy {proxy} refused CONNECT {target}: {status}")]
    ProxyRefused {
        proxy: String,
        target: String,
        status: String,
    },
    #[error("proxy {0} sent an invalid answer to CONNECT")]
    ProxyProtocol(String),
    #[error("invalid proxy URL `{0}`: {1}")]
    ProxyUrl(String, String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("timed out connecting to {0}")]
    Timeout(String),
}

/// An HTTP proxy (`http://[user[:password]@]host[:port]`).
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port`.
    pub address: String,
    /// `user:password`, for `Proxy-Authorization: Basic`.
    credentials: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("address", &self.address)
            .field("credentials", &self.credentials.as_ref().map(|_| "****"))
            .finish()
    }
}

impl Proxy {
    /// Parses a proxy URL as `HTTPS_PROXY` holds it (a bare `host:port` means http).
    pub fn parse(url: &str) -> Result<Proxy, DialError> {
        let bad = |m: &str| DialError::ProxyUrl(mask(url), m.to_string());
        let rest = match url.split_once("://") {
            Some(("http", r)) => r,
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "only http:// proxies are supported, not {scheme}://"
                )))
            }
            None => url,
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (credentials, host) = match authority.rsplit_once('@') {
            Some((c, h)) => {
                let dec = |s: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8()
                        .map(|c| c.into_owned())
                        .map_err(|_| bad("the credentials are not UTF-8"))
                };
                let (u, p) = c.split_once(':').unwrap_or((c, ""));
                (Some(format!("{}:{}", dec(u)?, dec(p)?)), h)
            }
            None => (None, authority),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let has_port = match host.strip_prefix('[') {
            Some(v6) => v6
                .rsplit_once("]:")
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok()),
            None => host
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.contains(':') && p.parse::<u16>().is_ok()),
        };
        let address = if has_port {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        Ok(Proxy {
            address,
            credentials,
        })
    }
}

/// A URL with its password hidden, for messages.
fn mask(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}****{}", &url[..s + 3], &url[at..]),
        (None, Some(at)) => format!("****{}", &url[at..]),
        _ => url.to_string(),
    }
}

/// The proxy settings of the environment, read once.
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    pub https: Option<Proxy>,
    pub http: Option<Proxy>,
    /// `NO_PROXY` entries, lowercase.
    pub no_proxy: Vec<String>,
}

impl ProxyConfig {
    /// From `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` (or their lowercase forms).
    pub fn from_env() -> Result<ProxyConfig, DialError> {
        let var = |k: &str| {
            std::env::var(k)
                .or_else(|_| std::env::var(k.to_ascii_lowercase()))
                .ok()
                .filter(|v| !v.trim().is_empty())
        };
        Ok(ProxyConfig {
            https: var("HTTPS_PROXY")
                .map(|u| Proxy::parse(u.trim()))
                .transpose()?,
            http: var("HTTP_PROXY")
                .map(|u| Proxy::parse(u.trim()))
                .transpose()?,
            no_proxy: var("NO_PROXY")
                .map(|v| {
                    v.split(',')
                        .map(|e| e.trim().to_ascii_lowercase())
                        .filter(|e| !e.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The proxy for `host:port` over TLS (`tls`) or not, unless `NO_PROXY` excludes it.
    pub fn for_target(&self, host: &str, port: u16, tls: bool) -> Option<&Proxy> {
        let proxy = if tls { &self.https } else { &self.http };
        let proxy = proxy.as_ref()?;
        (!self
            .no_proxy
            .iter()
            .any(|e| no_proxy_matches(e, host, port)))
        .then_some(proxy)
    }
}

/// Whether one `NO_PROXY` entry covers `host:port` (as Go's net/http reads it: `*`,
/// an IP, a CIDR, a domain and its subdomains, optionally with a port).
fn no_proxy_matches(entry: &str, host: &str, port: u16) -> bool {
    if entry == "*" {
        return true;
    }
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if let Some((net, bits)) = entry.split_once('/') {
        return match (
            net.parse::<std::net::IpAddr>(),
            bits.parse::<u32>(),
            host.parse::<std::net::IpAddr>(),
        ) {
            (Ok(n), Ok(b), Ok(h)) => in_cidr(n, b, h),
            _ => false,
        };
    }
    let (name, want_port) = match entry.rsplit_once(':') {
        Some((n, p)) if !n.contains(':') || entry.starts_with('[') => (
            n.trim_start_matches('[').trim_end_matches(']'),
            p.parse::<u16>().ok(),
        ),
        _ => (entry, None),
    };
    if want_port.is_some_and(|p| p != port) {
        return false;
    }
    let name = name.trim_start_matches("*.").trim_start_matches('.');
    host == name || host.ends_with(&format!(".{name}"))
}

fn in_cidr(net: std::net::IpAddr, bits: u32, ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr::*;
    match (net, ip) {
        (V4(n), V4(i)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(n) & mask == u32::from(i) & mask
        }
        (V6(n), V6(i)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// TLS towards kas.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<rustls::ClientConfig>,
    /// The name the certificate must carry.
    pub server_name: rustls::pki_types::ServerName<'static>,
}

/// Builds the TLS settings: the system's CAs plus `ca_pem`, ALPN h2; or, with
/// `insecure`, any certificate.
pub fn tls_config(
    ca_pem: Option<&[u8]>,
    insecure: bool,
) -> Result<Arc<rustls::ClientConfig>, DialError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DialError::Tls(e.to_string()))?;
    let mut cfg = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        // The system's CAs (a kas with a public certificate needs nothing more).
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
        if let Some(pem) = ca_pem {
            for c in rustls_pemfile::certs(&mut &pem[..]) {
                let c = c.map_err(|e| DialError::Tls(format!("--ca-cert: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| DialError::Tls(format!("--ca-cert: {e}")))?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts any certificate (`--kas-insecure-skip-tls-verify`, or a kubeconfig's
/// `insecure-skip-tls-verify`); signatures are still checked so the handshake itself
/// is sound.
#[derive(Debug)]
pub(crate) struct NoVerification(pub(crate) Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Any stream agentk speaks HTTP/2 over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One kas to dial, as tonic's connector: the configured host and port (resolved here
/// or by the proxy), the address it resolved to (direct connections), the proxy and
/// TLS to use.
#[derive(Clone)]
pub struct Dialer {
    pub host: String,
    pub port: u16,
    /// Where to connect directly (ignored through a proxy, which resolves `host`).
    pub addr: std::net::SocketAddr,
    pub proxy: Option<Proxy>,
    pub tls: Option<Tls>,
    pub timeout: Duration,
}

/// `host:port`, bracketing IPv6 hosts.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl Dialer {
    /// Connects (through the proxy when there is one), then does TLS when asked.
    pub async fn dial(&self) -> Result<Box<dyn Io>, DialError> {
        let target = host_port(&self.host, self.port);
        let work = async {
            let tcp = match &self.proxy {
                Some(p) => connect_via(p, &target).await?,
                None => TcpStream::connect(self.addr)
                    .await
                    .map_err(|source| DialError::Io {
                        what: format!("kas at {target} ({})", self.addr),
                        source,
                    })?,
            };
            let _ = tcp.set_nodelay(true);
            let io: Box<dyn Io> = match &self.tls {
                None => Box::new(tcp),
                Some(t) => {
                    let s = tokio_rustls::TlsConnector::from(t.config.clone())
                        .connect(t.server_name.clone(), tcp)
                        .await
                        .map_err(|e| DialError::Tls(format!("with kas at {target}: {e}")))?;
                    Box::new(s)
                }
            };
            Ok(io)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| DialError::Timeout(target.clone()))?
    }
}

/// A TCP tunnel to `target` through `proxy` (HTTP CONNECT).
async fn connect_via(proxy: &Proxy, target: &str) -> Result<TcpStream, DialError> {
    let mut s = TcpStream::connect(&proxy.address)
        .await
        .map_err(|source| DialError::Io {
            what: format!("proxy {}", proxy.address),
            source,
        })?;
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(c) = &proxy.credentials {
        let b = base64::engine::general_purpose::STANDARD.encode(c);
        req.push_str(&format!("Proxy-Authorization: Basic {b}\r\n"));
    }
    req.push_str("\r\n");
    let io = |source| DialError::Io {
        what: format!("proxy {}", proxy.address),
        source,
    };
    s.write_all(req.as_bytes()).await.map_err(io)?;
    // The answer's head, byte by byte: nothing after it may be consumed (it is kas's).
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(DialError::ProxyProtocol(proxy.address.clone()));
        }
        let n = s.read(&mut b).await.map_err(io)?;
        if n == 0 {
            return Err(DialError::ProxyProtocol(proxy.address.clone()));
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if !code.starts_with('2') {
        return Err(DialError::ProxyRefused {
            proxy: proxy.address.clone(),
            target: target.to_string(),
            status: status_line.to_string(),
        });
    }
    Ok(s)
}

impl tower::Service<http::Uri> for Dialer {
    type Response = TokioIo<Box<dyn Io>>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let d = self.clone();
        Box::pin(async move { d.dial().await.map(TokioIo::new) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        let p = Proxy::parse("http://user:p%40ss@proxy.corp:3128").expect("valid");
        assert_eq!(p.address, "proxy.corp:3128");
        assert_eq!(p.credentials.as_deref(), Some("user:p@ss"));
        assert!(!format!("{p:?}").contains("p@ss"));
        assert_eq!(
            Proxy::parse("proxy.corp").expect("valid").address,
            "proxy.corp:80"
        );
        assert_eq!(
            Proxy::parse("http://[::1]:8080/").expect("valid").address,
            "[::1]:8080"
        );
        let e = Proxy::parse("socks5://u:secret@p:1080").expect_err("refused");
        assert!(e.to_string().contains("only http://") && !e.to_string().contains("secret"));
    }

    #[test]
    fn no_proxy_like_go() {
        let m = |e: &str, h: &str, p: u16| no_proxy_matches(e, h, p);
        assert!(m("*", "kas.example.com", 443));
        assert!(m("example.com", "kas.example.com", 443));
        assert!(m(".example.com", "kas.example.com", 443));
        assert!(m("example.com", "example.com", 443));
        assert!(!m("example.com", "badexample.com", 443));
        assert!(m("kas.example.com:8150", "kas.example.com", 8150));
        assert!(!m("kas.example.com:8150", "kas.example.com", 443));
        assert!(m("10.0.0.0/8", "10.1.2.3", 1));
        assert!(!m("10.0.0.0/8", "11.1.2.3", 1));
        assert!(m("127.0.0.1", "127.0.0.1", 1));
        assert!(m("::1", "[::1]", 1));
        assert!(m("fd00::/8", "fd12::1", 1));
        let cfg = ProxyConfig {
            https: Some(Proxy::parse("http://p:1").expect("valid")),
            http: None,
            no_proxy: vec!["internal".into()],
        };
        assert!(cfg.for_target("kas.example.com", 443, true).is_some());
        assert!(
            cfg.for_target("kas.example.com", 8150, false).is_none(),
            "HTTP_PROXY unset"
        );
        assert!(cfg.for_target("kas.internal", 443, true).is_none());
    }
}
