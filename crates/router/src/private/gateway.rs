//! The gateway end of the private API: [`GatewayService`] takes an idle tunnel of the
//! connection a routing kas names (never looking anywhere else, so requests cannot
//! loop) and relays frames between the two streams, returning the agent's tunnel to
//! its pool after a clean exchange.

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{Empty, StreamBody};
use kas_proto::v1::gateway_server::Gateway;
use kas_proto::v1::{
    agent_frame, server_frame, tunnel_error, AgentFrame, Data, EndOfBody, RequestHead, ServerFrame,
    TunnelError,
};
use kas_proto::{GATEWAY_AGENT_METADATA, GATEWAY_CONNECTION_METADATA};
use kas_tunnel::{ExchangeError, Tunnel, TunnelRegistry};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::AbortOnDropHandle;
use tonic::{Request, Response, Status, Streaming};

use super::{GATEWAY_WAIT, RELAY_FRAMES};

/// The gateway end; served on the private listener behind JWT authentication.
pub struct GatewayService {
    registry: Arc<TunnelRegistry>,
    shutdown: watch::Receiver<bool>,
}

impl GatewayService {
    /// `shutdown` turning true ends idle `ForwardMany` streams, so that a stopping kas
    /// is not kept waiting by streams that would only carry future requests.
    pub fn new(registry: Arc<TunnelRegistry>, shutdown: watch::Receiver<bool>) -> Self {
        GatewayService { registry, shutdown }
    }

    /// The agent and connection a forwarded stream names; refused at once when this
    /// kas does not hold that connection.
    // The error goes straight back to tonic as the call's status.
    #[allow(clippy::result_large_err)]
    fn target(&self, req: &Request<Streaming<ServerFrame>>) -> Result<(u64, String), Status> {
        let agent_id: u64 = metadata(req, GATEWAY_AGENT_METADATA)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("missing or bad {GATEWAY_AGENT_METADATA}"))
            })?;
        let connection = metadata(req, GATEWAY_CONNECTION_METADATA)
            .ok_or_else(|| {
                Status::invalid_argument(format!("missing {GATEWAY_CONNECTION_METADATA}"))
            })?
            .to_string();
        if !holds(&self.registry, agent_id, &connection) {
            return Err(Status::unavailable(
                "this kas does not hold that agent connection",
            ));
        }
        Ok((agent_id, connection))
    }
}

/// Whether this kas holds `connection` of `agent_id`.
fn holds(registry: &TunnelRegistry, agent_id: u64, connection: &str) -> bool {
    registry
        .connection_keys(agent_id)
        .iter()
        .any(|k| **k == *connection)
}

fn metadata<'a>(req: &'a Request<Streaming<ServerFrame>>, key: &str) -> Option<&'a str> {
    req.metadata().get(key).and_then(|v| v.to_str().ok())
}

/// An idle tunnel of the named connection, or (when it is here but busy) of any of
/// this kas's own connections of the agent; `None` when the connection is gone.
async fn take_tunnel(
    registry: &Arc<TunnelRegistry>,
    agent_id: u64,
    connection: &str,
) -> Option<Tunnel> {
    if let Some(t) = registry.try_acquire_from(agent_id, connection) {
        return Some(t);
    }
    if !holds(registry, agent_id, connection) {
        return None;
    }
    registry.acquire(agent_id, GATEWAY_WAIT).await.ok()
}

type FrameSender = mpsc::Sender<Result<AgentFrame, Status>>;

#[tonic::async_trait]
impl Gateway for GatewayService {
    type ForwardManyStream = Relayed;

    async fn forward_many(
        &self,
        req: Request<Streaming<ServerFrame>>,
    ) -> Result<Response<Self::ForwardManyStream>, Status> {
        let (agent_id, connection) = self.target(&req)?;
        let (tx, rx) = mpsc::channel(RELAY_FRAMES);
        let inbound = RequestStream::new(req.into_inner());
        let relay = relay_many(
            self.registry.clone(),
            agent_id,
            connection,
            inbound,
            tx,
            self.shutdown.clone(),
        );
        Ok(Response::new(Relayed {
            relay: Some(Box::pin(relay)),
            rx,
        }))
    }
}

/// The gateway's response stream, which also drives the relay: polled by the task that
/// writes the response, so each frame reaches HTTP/2 without waking another task.
pub struct Relayed {
    relay: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    rx: mpsc::Receiver<Result<AgentFrame, Status>>,
}

impl futures::Stream for Relayed {
    type Item = Result<AgentFrame, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if let Some(relay) = self.relay.as_mut() {
            if relay.as_mut().poll(cx).is_ready() {
                // Done: its sender is dropped, so `rx` ends after the queued frames.
                self.relay = None;
            }
        }
        self.rx.poll_recv(cx)
    }
}

/// The request direction of a forwarded stream. Dropped before its end, it is read to
/// its end in the background: a dropped HTTP/2 stream is reset, and a peer that sees
/// too many resets closes the whole kas-to-kas connection.
struct RequestStream {
    stream: Option<Streaming<ServerFrame>>,
}

impl RequestStream {
    fn new(stream: Streaming<ServerFrame>) -> Self {
        RequestStream {
            stream: Some(stream),
        }
    }

    /// The next frame; `Ok(None)` once the routing kas closed its direction.
    async fn message(&mut self) -> Result<Option<ServerFrame>, Status> {
        let Some(s) = self.stream.as_mut() else {
            return Ok(None);
        };
        let m = s.message().await;
        if !matches!(m, Ok(Some(_))) {
            // Ended (or broken): nothing left to read.
            self.stream = None;
        }
        m
    }

    /// Drops the stream as it is (resetting it if still open).
    fn abandon(mut self) {
        self.stream = None;
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if let Some(s) = self.stream.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(drain(s));
            }
        }
    }
}

/// Reads a request direction to its end, giving up after a few seconds.
async fn drain(mut s: Streaming<ServerFrame>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = s.message().await {}
    })
    .await;
}

/// The request body as it arrives from the routing kas. At its end the request stream
/// goes to `back`, to carry the next exchange.
fn body_from_frames(
    inbound: RequestStream,
    back: oneshot::Sender<RequestStream>,
) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, String>>> {
    StreamBody::new(futures::stream::unfold(
        Some((inbound, back)),
        |st| async move {
            let (mut inbound, back) = st?;
            match inbound.message().await {
                Ok(Some(ServerFrame {
                    msg: Some(server_frame::Msg::Data(d)),
                })) => Some((Ok(Frame::data(d.data)), Some((inbound, back)))),
                Ok(Some(ServerFrame {
                    msg: Some(server_frame::Msg::EndOfBody(_)),
                })) => {
                    let _ = back.send(inbound);
                    None
                }
                Ok(_) => Some((Err("the request body ended early".to_string()), None)),
                Err(s) => Some((Err(s.to_string()), None)),
            }
        },
    ))
}

async fn send(tx: &FrameSender, msg: agent_frame::Msg) -> bool {
    tx.send(Ok(AgentFrame { msg: Some(msg) })).await.is_ok()
}

/// `ForwardMany`: exchanges one after another until the routing kas closes the stream,
/// an exchange does not end cleanly, the connection goes away or this kas stops.
async fn relay_many(
    registry: Arc<TunnelRegistry>,
    agent_id: u64,
    connection: String,
    mut inbound: RequestStream,
    tx: FrameSender,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = shutdown.wait_for(|s| *s) => {
                // This kas is stopping and its connections with it: no need to wait
                // for the routing kas to close its side.
                inbound.abandon();
                return;
            }
        };
        let head = match next {
            Ok(Some(ServerFrame {
                msg: Some(server_frame::Msg::RequestHead(h)),
            })) => h,
            _ => return,
        };
        // Without a tunnel the stream ends before a response head: the routing kas
        // sees the tunnel close and sends the request elsewhere.
        let Some(tunnel) = take_tunnel(&registry, agent_id, &connection).await else {
            return;
        };
        let upgrade = head.upgrade;
        match relay(tunnel, head, inbound, &tx).await {
            Some(rest) if !upgrade => inbound = rest,
            _ => return,
        }
    }
}

/// Relays one exchange. Returns the request stream when the exchange ended cleanly
/// (the stream carries the next exchange).
async fn relay(
    tunnel: Tunnel,
    head: RequestHead,
    inbound: RequestStream,
    tx: &FrameSender,
) -> Option<RequestStream> {
    let bodyless = head.upgrade || head.end_of_body;
    let (back_tx, back_rx) = oneshot::channel();
    let (res, rest) = if bodyless {
        (
            tunnel.round_trip(head, Empty::<Bytes>::new()).await,
            Some(inbound),
        )
    } else {
        let body = body_from_frames(inbound, back_tx);
        (tunnel.round_trip(head, body).await, None)
    };
    let (rhead, mut body) = match res {
        Ok(x) => x,
        Err(ExchangeError::Agent { code, message }) => {
            send(tx, agent_frame::Msg::Error(TunnelError { code, message })).await;
            return None;
        }
        // Ending the stream without a head tells the routing kas the tunnel broke
        // before the response started (it may retry elsewhere).
        Err(_) => return None,
    };
    let inline = rhead.end_of_body;
    let switching = rhead.status == 101;
    if !send(tx, agent_frame::Msg::ResponseHead(rhead)).await {
        return None;
    }
    let (up, rest) = match (switching, rest, body.outbound()) {
        (true, Some(mut rest), Some(out)) => (
            Some(AbortOnDropHandle::new(tokio::spawn(async move {
                while let Ok(Some(f)) = rest.message().await {
                    let end = matches!(f.msg, Some(server_frame::Msg::EndOfBody(_)));
                    if !out.send(f).await || end {
                        return;
                    }
                }
            }))),
            None,
        ),
        (_, rest, _) => (None, rest),
    };
    loop {
        match body.next_chunk().await {
            Ok(Some(data)) => {
                if !inline && !send(tx, agent_frame::Msg::Data(Data { data })).await {
                    return None;
                }
            }
            Ok(None) => {
                if !inline && !send(tx, agent_frame::Msg::EndOfBody(EndOfBody {})).await {
                    return None;
                }
                break;
            }
            Err(e) => {
                let (code, message) = match e {
                    ExchangeError::Agent { code, message } => (code, message),
                    other => (
                        tunnel_error::Code::UpstreamAborted as i32,
                        other.to_string(),
                    ),
                };
                send(tx, agent_frame::Msg::Error(TunnelError { code, message })).await;
                return None;
            }
        }
    }
    if let Some(mut up) = up {
        // Keep relaying the client's bytes until the client side ends too; an
        // upgraded stream is never reused.
        let _ = (&mut up).await;
        return None;
    }
    match rest {
        Some(rest) => Some(rest),
        // The request body's end hands the stream back; the agent normally answers
        // only after it, so this is immediate.
        None => tokio::time::timeout(GATEWAY_WAIT, back_rx)
            .await
            .ok()
            .and_then(|r| r.ok()),
    }
}
