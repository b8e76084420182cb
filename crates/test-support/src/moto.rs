//! AWS for tests: moto in server mode (PyPI `moto[server]`, installed by the test
//! command into `target/tools`), started on a free port with IAM authentication on
//! after the set-up calls, and a recording hop in front of it so tests can see exactly
//! what kas sent.

use crate::services::free_port;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A program of the tools venv (`target/tools/bin`), or from PATH.
pub fn tool(name: &str) -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/tools/bin")
        .join(name);
    if venv.is_file() {
        return venv;
    }
    PathBuf::from(name)
}

/// A moto server; killed on drop.
pub struct Moto {
    pub port: u16,
    child: Child,
}

impl Moto {
    /// Starts moto; the first `setup_calls` requests are not authenticated (the test's
    /// set-up makes them), every later one is, with IAM policies enforced.
    pub fn start(setup_calls: usize) -> Moto {
        let port = free_port();
        let child = Command::new(tool("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", setup_calls.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "moto_server not found: the test command installs moto[server] into target/tools",
            );
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moto did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto { port, child }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs a Python script with boto3 (from moto's venv) against this moto; its stdout.
    /// The script gets `MOTO` (the URL) in its environment.
    pub fn python(&self, script: &str) -> String {
        let out = Command::new(tool("python3"))
            .args(["-c", script])
            .env("MOTO", self.url())
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "set-up script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP hop that forwards everything to `target` (keeping the `Host` header, so
/// SigV4 signatures still verify) and records each request's method, path and body.
pub struct Recorder {
    pub url: String,
    seen: Arc<Mutex<Vec<String>>>,
    rewrite: Rewrite,
    throttle: Throttle,
    task: tokio::task::JoinHandle<()>,
}

/// Text replaced in responses (what AWS would answer where moto cannot, e.g. a stack
/// that rolled back).
type Rewrite = Arc<Mutex<Option<(String, String)>>>;

/// Requests of an action answered with AWS's throttling error instead of being
/// forwarded, and how many more times.
type Throttle = Arc<Mutex<Option<(String, usize)>>>;

/// Whether to throttle a request with `body`, counting it.
fn throttled(throttle: &Throttle, body: &[u8]) -> bool {
    let mut t = throttle.lock().unwrap_or_else(|p| p.into_inner());
    match t.as_mut() {
        Some((action, left)) if *left > 0 => {
            let hit = String::from_utf8_lossy(body).contains(&format!("Action={action}&"));
            if hit {
                *left -= 1;
            }
            hit
        }
        _ => false,
    }
}

/// AWS's answer to a request over its rate.
fn throttling() -> Forwarded {
    let body = "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>0</RequestId></ErrorResponse>";
    hyper::Response::builder()
        .status(400)
        .header(http::header::CONTENT_TYPE, "text/xml")
        .body(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed())
        .expect("response")
}

type Forwarded = hyper::Response<http_body_util::combinators::BoxBody<Bytes, hyper::Error>>;

/// Forwards `parts`/`body` to `target`, rewriting the response's text if asked.
async fn forward(
    client: &Client<HttpConnector, Full<Bytes>>,
    target: &str,
    mut parts: http::request::Parts,
    body: Bytes,
    rewrite: &Rewrite,
) -> Forwarded {
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = format!("{target}{pq}").parse().expect("uri");
    let failed = || {
        hyper::Response::builder()
            .status(502)
            .body(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
            .expect("response")
    };
    let Ok(resp) = client
        .request(hyper::Request::from_parts(parts, Full::new(body)))
        .await
    else {
        return failed();
    };
    let swap = rewrite.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // Error bodies are read whole, so the record can show them.
    let swap = match swap {
        Some(s) => s,
        None if resp.status().as_u16() >= 400 => (String::new(), String::new()),
        None => return resp.map(|b| b.boxed()),
    };
    let (from, to) = swap;
    let (mut head, body) = resp.into_parts();
    let Ok(body) = body.collect().await else {
        return failed();
    };
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    let text = if from.is_empty() {
        text
    } else {
        text.replace(&from, &to)
    };
    head.headers.remove(http::header::CONTENT_LENGTH);
    hyper::Response::from_parts(
        head,
        Full::new(Bytes::from(text)).map_err(|n| match n {}).boxed(),
    )
}

impl Recorder {
    pub async fn start(target: String) -> Recorder {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let rewrite: Rewrite = Arc::default();
        let throttle: Throttle = Arc::default();
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let (s, t, rw, th) = (
            seen.clone(),
            Arc::new(target),
            rewrite.clone(),
            throttle.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = l.accept().await {
                let (s, t, rw, th, client) =
                    (s.clone(), t.clone(), rw.clone(), th.clone(), client.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                        let (s, t, rw, th, client) =
                            (s.clone(), t.clone(), rw.clone(), th.clone(), client.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let token = parts
                                .headers
                                .get("x-amz-security-token")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_string();
                            let line = format!(
                                "{} {} token={token} {}",
                                parts.method,
                                parts.uri,
                                String::from_utf8_lossy(&body)
                            );
                            let resp = if throttled(&th, &body) {
                                throttling()
                            } else {
                                forward(&client, &t, parts, body, &rw).await
                            };
                            let status = resp.status().as_u16();
                            let (head, body) = resp.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let answer = if status >= 400 {
                                format!(" -> {}", String::from_utf8_lossy(&body))
                            } else {
                                String::new()
                            };
                            s.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(format!("{status} {line}{answer}"));
                            Ok::<_, std::convert::Infallible>(hyper::Response::from_parts(
                                head,
                                Full::new(body),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Recorder {
            url,
            seen,
            rewrite,
            throttle,
            task,
        }
    }

    /// Answers the next `times` requests of `action` (e.g. `CreateStack`) with AWS's
    /// `Throttling` error.
    pub fn throttle(&self, action: &str, times: usize) {
        *self.throttle.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((action.to_string(), times));
    }

    /// Replaces `from` with `to` in every response from now on (`None`: stop).
    pub fn rewrite(&self, swap: Option<(&str, &str)>) {
        *self.rewrite.lock().unwrap_or_else(|p| p.into_inner()) =
            swap.map(|(f, t)| (f.to_string(), t.to_string()));
    }

    /// Every request so far: `<status> <method> <uri> token=<x-amz-security-token> <body>`.
    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
