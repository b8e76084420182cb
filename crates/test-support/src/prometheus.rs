//! A Prometheus-like HTTP service for tests: what an application reaches "inside the
//! cluster" through the agent. Not Prometheus: a few fixed endpoints.
//!
//! - `/api/v1/query?query=...`: a Prometheus-style JSON answer echoing the query;
//! - `/api/v1/stream?n=N&ms=M`: N lines, one every M ms (a slow streamed response);
//! - `/api/v1/redirect`: 302 to a metadata address (a client must not follow it);
//! - `/api/v1/fail`: 500 with a body revealing internals (must not reach the caller);
//! - `/admin/config`: outside the `/api/v1/` prefix tests allow.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The body `/api/v1/fail` answers with; tests check it never reaches the caller.
pub const REVEALING: &str =
    "panic: connection to postgres://admin:hunter2@10.0.0.7/metrics refused";

fn full(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *r.status_mut() = status;
    r
}

fn param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

async fn handle(req: Request<Incoming>) -> Response<Body> {
    let q = req.uri().query().unwrap_or_default().to_string();
    match req.uri().path() {
        "/api/v1/query" => {
            let query = param(&q, "query").unwrap_or_default();
            let body = serde_json::json!({
                "status": "success",
                "data": {"resultType": "vector", "result": [
                    {"metric": {"__name__": query}, "value": [1_700_000_000, "1"]}
                ]}
            });
            let mut r = full(StatusCode::OK, body.to_string());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        "/api/v1/stream" => {
            let n: u32 = param(&q, "n").and_then(|v| v.parse().ok()).unwrap_or(5);
            let ms: u64 = param(&q, "ms").and_then(|v| v.parse().ok()).unwrap_or(200);
            let s = futures::stream::unfold(0u32, move |i| async move {
                if i >= n {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let line = Bytes::from(format!("{{\"sample\":{i}}}\n"));
                Some((Ok::<_, Infallible>(Frame::data(line)), i + 1))
            });
            Response::new(StreamBody::new(s).boxed_unsync())
        }
        "/api/v1/redirect" => {
            let mut r = full(StatusCode::FOUND, String::new());
            r.headers_mut().insert(
                http::header::LOCATION,
                http::HeaderValue::from_static("http://169.254.169.254/latest/meta-data/"),
            );
            r
        }
        "/api/v1/fail" => full(StatusCode::INTERNAL_SERVER_ERROR, REVEALING.to_string()),
        "/admin/config" => full(StatusCode::OK, "admin settings".into()),
        _ => full(StatusCode::NOT_FOUND, "not found".into()),
    }
}

/// Starts the service on a free port; it runs until the runtime ends.
pub async fn start() -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req| async move {
                    Ok::<_, Infallible>(handle(req).await)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}
