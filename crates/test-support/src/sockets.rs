//! Raw connections for tests that behave as careless or hostile clients do: connect
//! and say nothing, finish a TLS handshake and stop, hold connections open.

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// `host:port` of a URL such as `grpc://127.0.0.1:8150` or `https://h:1/k8s-proxy/`.
pub fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// A TCP connection to `url`'s host and port.
pub async fn connect(url: &str) -> std::io::Result<TcpStream> {
    TcpStream::connect(host_port(url)).await
}

/// A TLS connection (handshake done, nothing sent) to `url`, trusting `ca_pem`.
pub async fn tls_connect(
    ca_pem: &[u8],
    url: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(c?).map_err(std::io::Error::other)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = connect(url).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
        .map_err(std::io::Error::other)?
        .to_owned();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// Whether the far end closes the connection within `d` (reading gives end of stream
/// or an error). Data that arrives first is read and skipped.
pub async fn closed_within(io: &mut (impl AsyncRead + Unpin), d: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let read_to_end = async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(d, read_to_end).await.is_ok()
}
