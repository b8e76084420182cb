//! `portforward` as the kubelet serves it, over SPDY/3.1 (`portforward.k8s.io`) or
//! over WebSocket carrying that same SPDY session in binary messages
//! (`SPDY/3.1+portforward.k8s.io`, what kubectl 1.31+ asks for first). Every port of a
//! test pod echoes what it receives.
//!
//! Per forwarded connection the client opens two streams with the same `requestID`:
//! `error` (the server writes a message there if the port cannot be reached) and
//! `data`.

use super::exec::Upgrade;
use super::{spdy, status, Body, State};
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

const SPDY_PROTOCOL: &str = "portforward.k8s.io";
const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

pub(super) fn portforward(
    state: &Arc<State>,
    mut req: Request<Incoming>,
    pod: (&str, &str),
) -> Response<Body> {
    let (ns, name) = pod;
    if let Some(r) = super::exec::missing_pod(state, ns, name) {
        return r;
    }
    let bad = |m: &str| status(StatusCode::BAD_REQUEST, "BadRequest", m);
    let Some(upgrade) = Upgrade::of(&req) else {
        return bad("Upgrade request required");
    };
    let websocket = matches!(upgrade, Upgrade::WebSocket { .. });
    let supported = if websocket {
        TUNNEL_PROTOCOL
    } else {
        SPDY_PROTOCOL
    };
    let Some(protocol) = upgrade.pick(&[supported]) else {
        return bad(&format!(
            "unable to upgrade: no supported protocol offered (this server speaks {supported})"
        ));
    };
    upgrade.accept(&mut req, state, protocol, |io, websocket| async move {
        if websocket {
            tunnel(io).await;
        } else {
            serve(io).await;
        }
    })
}

/// Serves the SPDY session: each `data` stream echoes; `error` streams stay silent
/// unless the stream's port is not a port.
async fn serve<I>(io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let mut streams = spdy::serve(io);
    let mut errors: HashMap<String, spdy::Sender> = HashMap::new();
    while let Some(s) = streams.recv().await {
        let request = s.headers.get("requestid").cloned().unwrap_or_default();
        let port = s.headers.get("port").cloned().unwrap_or_default();
        match s.headers.get("streamtype").map(String::as_str) {
            Some("error") => {
                errors.insert(request, s.out);
            }
            Some("data") => {
                let error = errors.remove(&request);
                if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
                    if let Some(e) = error {
                        e.send(format!("invalid port \"{port}\"").as_bytes()).await;
                        e.close().await;
                    }
                    s.out.close().await;
                    continue;
                }
                let spdy::Stream { mut data, out, .. } = s;
                tokio::spawn(async move {
                    while let Some(b) = data.recv().await {
                        if !out.send(&b).await {
                            return;
                        }
                    }
                    out.close().await;
                    if let Some(e) = error {
                        e.close().await;
                    }
                });
            }
            _ => s.out.close().await,
        }
    }
}

/// Unwraps the SPDY session from WebSocket binary messages.
async fn tunnel<I>(io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let (mut sink, mut incoming) = ws.split();
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    tokio::spawn(serve(theirs));
    let (mut rd, mut wr) = tokio::io::split(ours);
    let inbound = async move {
        while let Some(Ok(msg)) = incoming.next().await {
            match msg {
                Message::Binary(b) if wr.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    tokio::join!(inbound, outbound);
}
