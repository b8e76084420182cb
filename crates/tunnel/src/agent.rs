//! agentk's end of a tunnel: the exchanges kas sends down one stream, served one after
//! another by a [`Handler`] (agentk's: the cluster or an in-cluster service).
//!
//! Per exchange: the request head arrives; the request body (or, after a 101, the
//! client's bytes) is handed to the handler through a small channel, read from the
//! stream only as the handler takes it (the backpressure towards kas); the handler
//! answers through [`AgentOut`]. A clean exchange leaves the stream ready for the next
//! one; anything else ends it, half-closing our side first and reading kas's side to
//! its end, so no frame still queued is lost to a reset. Requests for in-cluster
//! services are allowed only as the configuration's `service_access` says
//! ([`service_allowed`]).

use crate::frame::{self, FrameSink};
use bytes::Bytes;
use kas_proto::v1::{
    agent_frame, server_frame, tunnel_error::Code, AgentFrame, EndOfBody, Hello, RequestHead,
    ResponseHead, ServerFrame, ServiceAccess, TunnelError,
};
use kas_proto::{service_path_escapes, PROTOCOL_VERSION};
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::Streaming;

/// How long a tunnel that is closing waits for kas to close its half of the stream.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of a request body, unread by its handler, that is read and dropped to keep
/// the tunnel; past it the tunnel ends instead (kas then uses another).
const UNREAD_BODY_LIMIT: usize = 1024 * 1024;
/// Request body chunks queued for the handler.
const BODY_CHUNKS: usize = 4;

/// The first frame of every tunnel.
pub fn hello() -> AgentFrame {
    frame::agent(agent_frame::Msg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
    }))
}

/// The agent -> kas direction of one tunnel.
#[derive(Clone)]
pub struct AgentOut(pub mpsc::Sender<AgentFrame>);

impl AgentOut {
    async fn send(&self, msg: agent_frame::Msg) -> bool {
        self.0.send(frame::agent(msg)).await.is_ok()
    }

    /// The response head (with the whole body in it when `end_of_body`).
    pub async fn head(&self, head: ResponseHead) -> bool {
        self.send(agent_frame::Msg::ResponseHead(head)).await
    }

    /// Answers the exchange with an error instead of a response. `message` must be
    /// safe to show the caller: never an upstream body.
    pub async fn fail(&self, code: Code, message: &str) {
        let e = TunnelError {
            code: code as i32,
            message: message.to_string(),
        };
        self.send(agent_frame::Msg::Error(e)).await;
    }
}

impl FrameSink for AgentOut {
    async fn data(&self, data: Bytes) -> bool {
        self.send(agent_frame::Msg::Data(kas_proto::v1::Data { data }))
            .await
    }

    async fn end(&self) -> bool {
        self.send(agent_frame::Msg::EndOfBody(EndOfBody {})).await
    }

    /// The upstream's body failed midway: its error stays in the agent's log.
    async fn abort(&self, reason: &str) {
        tracing::warn!(error = %reason, "upstream response body failed");
        self.fail(Code::UpstreamAborted, "the cluster's response was cut off")
            .await;
    }
}

/// Serves the requests that arrive through tunnels.
pub trait Handler: Send + Sync {
    /// What one tunnel keeps from one exchange to the next (agentk: its connection to
    /// the cluster), dropped with the tunnel.
    type Tunnel: Default + Send;

    /// Serves `head`, whose body (after a 101: the client's bytes) arrives on `body`
    /// (none when the head was the whole request), answering on `out`. Returns true
    /// when a complete, non-upgraded response was sent, so the tunnel can carry
    /// another exchange.
    fn respond(
        &self,
        tunnel: &mut Self::Tunnel,
        head: RequestHead,
        body: Option<mpsc::Receiver<Bytes>>,
        out: &AgentOut,
    ) -> impl Future<Output = bool> + Send;
}

/// What a tunnel's owner learns as it serves (pool accounting).
pub trait TunnelState {
    /// An exchange started: the tunnel is busy.
    fn busy(&mut self);
    /// The exchange ended cleanly: the tunnel is idle again.
    fn idle(&mut self);
    /// An exchange ended the tunnel (cancelled, failed or upgraded).
    fn failed(&mut self) {}
}

/// Serves exchanges on one tunnel until kas ends it or an exchange does not end
/// cleanly. `inbound` is kas's direction of the stream, `out` ours.
pub async fn serve<H: Handler>(
    mut inbound: Streaming<ServerFrame>,
    out: AgentOut,
    handler: &H,
    state: &mut impl TunnelState,
) {
    let mut kept = H::Tunnel::default();
    loop {
        let head = match inbound.message().await {
            Ok(Some(ServerFrame {
                msg: Some(server_frame::Msg::RequestHead(h)),
            })) => h,
            other => {
                tracing::debug!(?other, "tunnel ended without a request");
                return;
            }
        };
        state.busy();
        if exchange(handler, &mut kept, head, &mut inbound, &out).await {
            state.idle();
            continue;
        }
        state.failed();
        drop(kept);
        // End our half of the stream, then keep receiving until kas ends its half:
        // dropping the receiving half first would reset the stream and could discard
        // frames still queued for sending.
        drop(out);
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
        return;
    }
}

/// Reads and drops the rest of a request body that the handler did not wait for, up
/// to its EndOfBody: true if that came within [`UNREAD_BODY_LIMIT`] and
/// [`DRAIN_TIMEOUT`] (the tunnel can carry another exchange).
async fn finish_request_body(inbound: &mut Streaming<ServerFrame>) -> bool {
    let mut dropped = 0usize;
    let rest = async {
        loop {
            match inbound.message().await {
                Ok(Some(ServerFrame {
                    msg: Some(server_frame::Msg::Data(d)),
                })) => {
                    dropped = dropped.saturating_add(d.data.len());
                    if dropped > UNREAD_BODY_LIMIT {
                        return false;
                    }
                }
                Ok(Some(ServerFrame {
                    msg: Some(server_frame::Msg::EndOfBody(_)),
                })) => return true,
                _ => return false,
            }
        }
    };
    tokio::time::timeout(DRAIN_TIMEOUT, rest)
        .await
        .unwrap_or(false)
}

/// Reserves room for one chunk in the request-body channel (owned, so the channel can
/// be dropped while a reservation is pending).
async fn reserve(tx: Option<mpsc::Sender<Bytes>>) -> Option<mpsc::OwnedPermit<Bytes>> {
    tx?.reserve_owned().await.ok()
}

/// Serves one exchange whose `head` has arrived. Returns true when it completed
/// cleanly in both directions.
async fn exchange<H: Handler>(
    handler: &H,
    kept: &mut H::Tunnel,
    head: RequestHead,
    inbound: &mut Streaming<ServerFrame>,
    out: &AgentOut,
) -> bool {
    let request_id = head.request_id.clone();
    tracing::debug!(%request_id, method = %head.method, path = %head.path_and_query, upgrade = head.upgrade, "serving a request");
    // A head marked end_of_body is the whole request: no body frames follow, and no
    // channel is needed for them.
    let mut request_done = head.end_of_body && !head.upgrade;
    let (mut body_tx, body_rx) = if request_done {
        (None, None)
    } else {
        let (tx, rx) = mpsc::channel::<Bytes>(BODY_CHUNKS);
        (Some(tx), Some(rx))
    };
    let mut pending: Option<Bytes> = None;
    let work = handler.respond(kept, head, body_rx, out);
    tokio::pin!(work);
    // One task reads kas's frames and drives the response, so the stream can be
    // reused afterwards. A chunk waits in `pending` until the body channel has room.
    loop {
        tokio::select! {
            biased;
            reusable = &mut work => {
                if !reusable {
                    return false;
                }
                if request_done {
                    return true;
                }
                // The handler answered before the whole request body arrived (an early
                // answer such as 403 or 413). kas counts the exchange clean once it
                // has sent the body and read the response, and hands the tunnel to its
                // next request: read the rest of the body, so that both ends agree.
                return finish_request_body(inbound).await;
            }
            permit = reserve(body_tx.clone()), if pending.is_some() => match (permit, pending.take()) {
                (Some(p), Some(chunk)) => {
                    p.send(chunk);
                }
                // The handler stopped reading the body; drop the rest of it.
                _ => body_tx = None,
            },
            frame = inbound.message(), if pending.is_none() => match frame {
                Ok(Some(ServerFrame { msg: Some(server_frame::Msg::Data(d)) })) if !request_done => {
                    if body_tx.is_some() {
                        pending = Some(d.data);
                    }
                }
                Ok(Some(ServerFrame { msg: Some(server_frame::Msg::EndOfBody(_)) })) if !request_done => {
                    request_done = true;
                    body_tx = None;
                }
                _ => {
                    // kas ended the stream (the client went away, or kas did), or broke
                    // the protocol: cancel the request.
                    tracing::debug!(%request_id, "kas cancelled the request");
                    return false;
                }
            },
        }
    }
}

/// Whether any `service_access` entry allows a request for `path` (path only, no
/// query) on a service: scheme, host (case-insensitive) and port equal, and the path
/// under the entry's prefix without stepping out of it.
pub fn service_allowed(
    allowed: &[ServiceAccess],
    scheme: &str,
    host: &str,
    port: u16,
    path: &str,
) -> bool {
    if service_path_escapes(path) {
        return false;
    }
    let with_slash = format!("{}/", path.trim_end_matches('/'));
    allowed.iter().any(|s| {
        scheme.eq_ignore_ascii_case(&s.scheme)
            && host.eq_ignore_ascii_case(&s.host)
            && u32::from(port) == s.port
            && (path.starts_with(&s.path_prefix) || with_slash == s.path_prefix)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_must_match_scheme_host_port_and_prefix() {
        let list = [ServiceAccess {
            scheme: "http".into(),
            host: "prom.mon".into(),
            port: 9090,
            path_prefix: "/api/v1/".into(),
        }];
        let ok = |s, h, p, path| service_allowed(&list, s, h, p, path);
        assert!(ok("http", "prom.mon", 9090, "/api/v1/query"));
        assert!(ok("http", "PROM.mon", 9090, "/api/v1"));
        assert!(!ok("https", "prom.mon", 9090, "/api/v1/query"));
        assert!(!ok("http", "prom.mon", 9091, "/api/v1/query"));
        assert!(!ok("http", "other", 9090, "/api/v1/query"));
        assert!(!ok("http", "prom.mon", 9090, "/api/v2/query"));
        assert!(!ok("http", "prom.mon", 9090, "/api/v1x"));
        assert!(!ok("http", "prom.mon", 9090, "/api/v1/../../admin"));
        assert!(!ok("http", "prom.mon", 9090, "/api/v1/%2e%2e/admin"));
        assert!(!ok("http", "prom.mon", 9090, "/api/v1%2f..%2fadmin"));
        assert!(!service_allowed(&[], "http", "prom.mon", 9090, "/api/v1/"));
    }
}
