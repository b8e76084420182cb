//! A small HTTPS client for tests that talk to the Kubernetes API proxy directly.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;

pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A client trusting exactly `ca_pem` (and plain http for http:// URLs).
pub fn client(ca_pem: &[u8], http2: bool) -> HttpsClient {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(c.expect("CA pem")).expect("CA cert");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg)
        .https_or_http();
    let connector = if http2 {
        b.enable_http1().enable_http2().build()
    } else {
        b.enable_http1().build()
    };
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// GET `url` with an optional bearer token; returns status and whole body.
pub async fn get(client: &HttpsClient, url: &str, bearer: Option<&str>) -> (u16, String) {
    let resp = send(client, url, bearer).await;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// GETs `url` until it answers `status`, for at most `timeout`; returns the last answer.
/// For endpoints that follow another process's state, such as a readiness probe.
pub async fn get_until(
    client: &HttpsClient,
    url: &str,
    status: u16,
    timeout: std::time::Duration,
) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let answer = get(client, url, None).await;
        if answer.0 == status || tokio::time::Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// GET `url`, returning the response with its body unread.
pub async fn send(
    client: &HttpsClient,
    url: &str,
    bearer: Option<&str>,
) -> hyper::Response<hyper::body::Incoming> {
    let mut b = http::Request::get(url);
    if let Some(t) = bearer {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    client
        .request(b.body(Empty::new()).expect("request"))
        .await
        .expect("send request")
}

/// kas's metrics text from its observability URL.
pub async fn scrape(observability: &str) -> String {
    let c = client(&[], false);
    let (code, body) = get(&c, &format!("{observability}/metrics"), None).await;
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of the sample whose line starts with `prefix` (name and labels), or 0.
pub fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
