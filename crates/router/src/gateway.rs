//! The private API's exchange forwarding, both ends.
//!
//! Routing kas: [`Peers::open`] opens a `Gateway.Forward` stream to the kas holding
//! the chosen connection and wraps it as a [`Tunnel`], so the proxy streams through
//! it exactly as through a local agent tunnel. Gateway kas: [`GatewayService`] takes an
//! idle tunnel of the named connection (never looking anywhere else, so requests
//! cannot loop) and relays frames between the two streams, returning the agent's
//! tunnel to its pool after a clean exchange.

use crate::jwt::PrivateAuth;
use bytes::Bytes;
use futures::StreamExt;
use http_body::Frame;
use http_body_util::{Empty, StreamBody};
use kas_proto::v1::gateway_client::GatewayClient;
use kas_proto::v1::gateway_server::Gateway;
use kas_proto::v1::{
    agent_frame, server_frame, tunnel_error, AgentFrame, Data, EndOfBody, ServerFrame, TunnelError,
};
use kas_proto::{GATEWAY_AGENT_METADATA, GATEWAY_CONNECTION_METADATA};
use kas_tunnel::{outbound_channel, ExchangeError, Tunnel, TunnelRegistry};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

/// How long a forwarded exchange may wait on the gateway for a busy connection.
const GATEWAY_WAIT: Duration = Duration::from_secs(5);

/// The gateway end; served on the private listener behind JWT authentication.
pub struct GatewayService {
    registry: Arc<TunnelRegistry>,
}

impl GatewayService {
    pub fn new(registry: Arc<TunnelRegistry>) -> Self {
        GatewayService { registry }
    }
}

fn metadata<'a>(req: &'a Request<Streaming<ServerFrame>>, key: &str) -> Option<&'a str> {
    req.metadata().get(key).and_then(|v| v.to_str().ok())
}

type FrameSender = mpsc::Sender<Result<AgentFrame, Status>>;

#[tonic::async_trait]
impl Gateway for GatewayService {
    type ForwardStream = Relayed;

    async fn forward(
        &self,
        req: Request<Streaming<ServerFrame>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let agent_id: u64 = metadata(&req, GATEWAY_AGENT_METADATA)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("missing or bad {GATEWAY_AGENT_METADATA}"))
            })?;
        let connection = metadata(&req, GATEWAY_CONNECTION_METADATA)
            .ok_or_else(|| {
                Status::invalid_argument(format!("missing {GATEWAY_CONNECTION_METADATA}"))
            })?
            .to_string();
        let tunnel = match self.registry.try_acquire_from(agent_id, &connection) {
            Some(t) => t,
            // The named connection is here but busy: any of this kas's own connections
            // of the agent will do (still no further routing).
            None if self
                .registry
                .connection_keys(agent_id)
                .iter()
                .any(|k| **k == *connection) =>
            {
                self.registry
                    .acquire(agent_id, GATEWAY_WAIT)
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?
            }
            None => {
                return Err(Status::unavailable(
                    "this kas does not hold that agent connection",
                ))
            }
        };
        let (tx, rx) = mpsc::channel(16);
        Ok(Response::new(Relayed {
            relay: Some(Box::pin(relay(tunnel, req.into_inner(), tx))),
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

/// The request body as it arrives from the routing kas.
fn body_from_frames(
    inbound: Streaming<ServerFrame>,
) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, String>>> {
    StreamBody::new(futures::stream::unfold(Some(inbound), |st| async move {
        let mut inbound = st?;
        match inbound.message().await {
            Ok(Some(ServerFrame {
                msg: Some(server_frame::Msg::Data(d)),
            })) => Some((Ok(Frame::data(d.data)), Some(inbound))),
            Ok(Some(ServerFrame {
                msg: Some(server_frame::Msg::EndOfBody(_)),
            })) => {
                // The routing kas closes its side right after; see it close, so the
                // stream ends cleanly instead of being reset.
                drain(inbound).await;
                None
            }
            Ok(_) => Some((Err("the request body ended early".to_string()), None)),
            Err(s) => Some((Err(s.to_string()), None)),
        }
    }))
}

/// Reads the request direction to its end (briefly): an HTTP/2 stream whose request
/// side is dropped unread is reset, and too many resets make the peer close the
/// whole connection.
async fn drain(mut inbound: Streaming<ServerFrame>) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
}

async fn send(tx: &FrameSender, msg: agent_frame::Msg) -> bool {
    tx.send(Ok(AgentFrame { msg: Some(msg) })).await.is_ok()
}

async fn relay(tunnel: Tunnel, mut inbound: Streaming<ServerFrame>, tx: FrameSender) {
    let head = match inbound.message().await {
        Ok(Some(ServerFrame {
            msg: Some(server_frame::Msg::RequestHead(h)),
        })) => h,
        _ => return,
    };
    let bodyless = head.upgrade || head.end_of_body;
    let (res, rest) = if bodyless {
        (
            tunnel.round_trip(head, Empty::<Bytes>::new()).await,
            Some(inbound),
        )
    } else {
        (
            tunnel.round_trip(head, body_from_frames(inbound)).await,
            None,
        )
    };
    let (rhead, mut body) = match res {
        Ok(x) => x,
        Err(ExchangeError::Agent { code, message }) => {
            send(&tx, agent_frame::Msg::Error(TunnelError { code, message })).await;
            return;
        }
        // Ending the stream without a head tells the routing kas the tunnel broke
        // before the response started (it may retry elsewhere).
        Err(_) => return,
    };
    let inline = rhead.end_of_body;
    let switching = rhead.status == 101;
    if !send(&tx, agent_frame::Msg::ResponseHead(rhead)).await {
        return;
    }
    let (up, rest) = match (switching, rest, body.outbound()) {
        (true, Some(mut rest), Some(out)) => (
            Some(crate::AbortOnDrop(tokio::spawn(async move {
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
                if !inline && !send(&tx, agent_frame::Msg::Data(Data { data })).await {
                    return;
                }
            }
            Ok(None) => {
                if !inline {
                    send(&tx, agent_frame::Msg::EndOfBody(EndOfBody {})).await;
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
                send(&tx, agent_frame::Msg::Error(TunnelError { code, message })).await;
                return;
            }
        }
    }
    match (up, rest) {
        // Keep relaying the client's bytes until the client side ends too.
        (Some(mut up), _) => {
            let _ = (&mut up.0).await;
        }
        (None, Some(rest)) => drain(rest).await,
        (None, None) => {}
    }
}

/// Clients for the other kas replicas' private APIs, one HTTP/2 channel each.
pub struct Peers {
    auth: Arc<PrivateAuth>,
    channels: Mutex<HashMap<String, GatewayClient<Channel>>>,
}

/// Why a remote connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("bad private API URL {url}: {source}")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the gateway kas refused: {0}")]
    Refused(Box<Status>),
    #[error("the gateway kas did not answer in time")]
    Timeout,
}

impl Peers {
    pub fn new(auth: Arc<PrivateAuth>) -> Self {
        Peers {
            auth,
            channels: Mutex::default(),
        }
    }

    fn client(&self, url: &str) -> Result<GatewayClient<Channel>, OpenError> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(url) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(url.to_string())
            .map_err(|source| OpenError::Url {
                url: url.to_string(),
                source,
            })?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024);
        let c = GatewayClient::new(ep.connect_lazy())
            .max_decoding_message_size(kas_proto::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(kas_proto::MAX_MESSAGE_SIZE);
        map.insert(url.to_string(), c.clone());
        Ok(c)
    }

    /// Opens a forwarded exchange to `connection` of `agent_id` on the kas at `url`.
    ///
    /// `eager`: wait until the gateway accepted the stream, so that a refusal is known
    /// before any of the request is sent (needed when the request body cannot be
    /// replayed elsewhere). Otherwise the request head travels with the stream's
    /// opening, saving a round trip, and a refusal shows up as the tunnel closing
    /// before the response head (the proxy then retries elsewhere).
    pub async fn open(
        &self,
        url: &str,
        agent_id: u64,
        connection: &str,
        eager: bool,
    ) -> Result<Tunnel, OpenError> {
        let mut client = self.client(url)?;
        let (out, stream) = outbound_channel(16);
        let frames = stream
            .take_while(|r| std::future::ready(r.is_ok()))
            .filter_map(|r| std::future::ready(r.ok()));
        let mut req = Request::new(frames);
        let md = req.metadata_mut();
        let bearer = format!("Bearer {}", self.auth.token());
        let pairs = [
            ("authorization", bearer),
            (GATEWAY_AGENT_METADATA, agent_id.to_string()),
            (GATEWAY_CONNECTION_METADATA, connection.to_string()),
        ];
        for (k, v) in pairs {
            let v = v.parse().map_err(|_| {
                OpenError::Refused(Box::new(Status::invalid_argument("bad metadata")))
            })?;
            md.insert(k, v);
        }
        let label: Arc<str> = Arc::from(format!("{url}#{connection}"));
        let call = async move {
            match tokio::time::timeout(GATEWAY_WAIT * 2, client.forward(req)).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(
                    "the gateway kas did not answer in time",
                )),
            }
        };
        if eager {
            let resp = call.await.map_err(|s| OpenError::Refused(Box::new(s)))?;
            return Ok(Tunnel::remote(
                agent_id,
                label,
                Box::pin(resp.into_inner()),
                out,
            ));
        }
        let inbound = futures::stream::once(call).flat_map(|r| match r {
            Ok(resp) => resp.into_inner().boxed(),
            Err(status) => futures::stream::once(std::future::ready(Err(status))).boxed(),
        });
        Ok(Tunnel::remote(agent_id, label, Box::pin(inbound), out))
    }
}
