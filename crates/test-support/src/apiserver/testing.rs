//! Test-only endpoints under `/_test/`: `bytes?n=N` (a streamed body of N bytes),
//! `abort` (64 KiB, then the body fails), `stream` (an endless slow body), `echo`
//! (POST: streams the request body back), `slow?ms=N` (answers after N ms, default
//! 2000), `requests` (the recorded requests as JSON).

use super::{json_resp, status, Body, State, StreamGuard};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Serves `/_test/<what>`.
pub(super) async fn handle(
    state: &Arc<State>,
    req: Request<Incoming>,
    what: &str,
    param: &(dyn Fn(&str) -> Option<String> + Send + Sync),
) -> Response<Body> {
    let state = state.clone();
    match (req.method().clone(), what) {
        (Method::GET, "slow") => {
            let ms: u64 = param("ms").and_then(|v| v.parse().ok()).unwrap_or(2000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json_resp(StatusCode::OK, &json!({"kind": "Slow", "waitedMs": ms}))
        }
        (_, "requests") => json_resp(
            StatusCode::OK,
            &serde_json::to_value(
                state
                    .recorded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            )
            .unwrap_or(Value::Null),
        ),
        (Method::GET, "bytes") => {
            let n: u64 = param("n").and_then(|v| v.parse().ok()).unwrap_or(0);
            let chunk = Bytes::from(vec![b'k'; 64 * 1024]);
            let st = state.clone();
            let s = futures::stream::unfold(n, move |left| {
                let chunk = chunk.clone();
                let st = st.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let take = left.min(chunk.len() as u64) as usize;
                    st.bytes_served
                        .fetch_add(take as u64, std::sync::atomic::Ordering::SeqCst);
                    Some((
                        Ok::<_, std::io::Error>(Frame::data(chunk.slice(..take))),
                        left - take as u64,
                    ))
                }
            });
            let mut r = Response::new(StreamBody::new(s).boxed_unsync());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        (Method::GET, "abort") => {
            // Some bytes, then the body fails: the connection breaks mid-response.
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from(vec![b'a'; 64 * 1024]))))
                    .await;
                // Fail a little later, once the head and first bytes are on the wire.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx
                    .send(Err(std::io::Error::other(
                        "upstream failed mid-body: secret detail",
                    )))
                    .await;
            });
            Response::new(
                StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync(),
            )
        }
        (Method::GET, "stream") => {
            let guard = StreamGuard::new(&state);
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                let _guard = guard;
                let chunk = Bytes::from(vec![b's'; 16 * 1024]);
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                loop {
                    tokio::select! {
                        _ = tick.tick() => if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() { return },
                        _ = tx.closed() => return,
                    }
                }
            });
            Response::new(
                StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync(),
            )
        }
        (Method::POST, "echo") => {
            let mut r = Response::new(
                req.into_body()
                    .map_err(std::io::Error::other)
                    .boxed_unsync(),
            );
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        _ => status(StatusCode::NOT_FOUND, "NotFound", "no such test endpoint"),
    }
}
