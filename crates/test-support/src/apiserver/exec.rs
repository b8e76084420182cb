//! `exec` and `attach` over WebSocket (`v5.channel.k8s.io`/`v4.channel.k8s.io`), and pod
//! logs (with `follow`).
//!
//! `exec`: `echo ARGS` prints its arguments; any other command echoes stdin to stdout
//! until stdin closes.

use super::{full, status, Body, State, StreamGuard};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

pub(super) fn logs(state: &Arc<State>, ns: &str, name: &str, follow: bool) -> Response<Body> {
    let exists = state.lock().get("/pods", ns, name).is_some();
    if !exists {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pods \"{name}\" not found"),
        );
    }
    if !follow {
        return full(
            StatusCode::OK,
            "text/plain",
            format!("{name}: line 1\n{name}: line 2\n"),
        );
    }
    let guard = StreamGuard::new(state);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let name = name.to_string();
    tokio::spawn(async move {
        let _guard = guard;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for i in 1.. {
            tokio::select! {
                _ = tick.tick() => if tx.send(Ok(Frame::data(Bytes::from(format!("{name}: line {i}\n"))))).await.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    let mut r = Response::new(
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync(),
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// `exec` (and `attach`) over WebSocket: `echo ARGS` prints its arguments; any other
/// command echoes stdin to stdout until stdin closes.
pub(super) fn exec(
    state: &Arc<State>,
    mut req: Request<Incoming>,
    params: &[(String, String)],
) -> Response<Body> {
    let h = req.headers();
    let is_ws = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = h
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "exec needs a WebSocket upgrade (this test server does not speak SPDY)",
        );
    };
    if !is_ws {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "exec needs a WebSocket upgrade",
        );
    }
    let offered: Vec<String> = h
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .collect();
    let Some(proto) = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        .into_iter()
        .find(|p| offered.iter().any(|o| o == p))
    else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "no supported exec subprotocol offered",
        );
    };
    let command: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let guard = StreamGuard::new(state);
    let v5 = proto.starts_with("v5");
    tokio::spawn(async move {
        let _guard = guard;
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        let out = |ch: u8, data: &[u8]| {
            let mut v = Vec::with_capacity(data.len() + 1);
            v.push(ch);
            v.extend_from_slice(data);
            Message::binary(v)
        };
        if command.first().map(String::as_str) == Some("echo") {
            let _ = ws
                .send(out(1, format!("{}\n", command[1..].join(" ")).as_bytes()))
                .await;
        } else {
            while let Some(Ok(msg)) = ws.next().await {
                let reply = match msg {
                    Message::Binary(b) if b.first() == Some(&0) => out(1, &b[1..]),
                    // v5: stdin closed.
                    Message::Binary(b) if v5 && b.first() == Some(&255) => break,
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    return;
                }
            }
        }
        let _ = ws
            .send(out(3, br#"{"metadata":{},"status":"Success"}"#))
            .await;
        let _ = ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    });
    let mut r = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hm = r.headers_mut();
    hm.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    hm.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    if let Ok(v) = accept.parse() {
        hm.insert("sec-websocket-accept", v);
    }
    hm.insert(
        "sec-websocket-protocol",
        header::HeaderValue::from_static(proto),
    );
    r
}
