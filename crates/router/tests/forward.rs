//! Forwarding between kas replicas over the private API, both ends in one process: a
//! real gateway served on a port, the routing side's `Peers`, and an in-process agent
//! whose tunnels answer each request with what they received.

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{Empty, Full};
use kas_proto::v1::gateway_server::GatewayServer;
use kas_proto::v1::{
    agent_frame, server_frame, AgentFrame, RequestHead, ResponseHead, ServerFrame,
};
use kas_router::{GatewayService, Peers, PrivateAuth};
use kas_tunnel::{outbound_channel, ExchangeError, ReplicaGuard, ReplicaInfo, TunnelRegistry};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Status;

const AGENT: u64 = 7;
const LIMIT: Duration = Duration::from_secs(10);

/// One tunnel of the in-process agent: answers every request on it with
/// "<method> <path> <body length>", inline.
fn offer_tunnel(registry: &Arc<TunnelRegistry>, key: &Arc<str>) {
    let (out, mut requests) = outbound_channel(16);
    let (tx, rx) = mpsc::channel::<Result<AgentFrame, Status>>(16);
    registry.offer(AGENT, key, Box::pin(ReceiverStream::new(rx)), out);
    tokio::spawn(async move {
        loop {
            let head = match requests.next().await {
                Some(Ok(ServerFrame {
                    msg: Some(server_frame::Msg::RequestHead(h)),
                })) => h,
                _ => return,
            };
            let mut len = 0;
            if !head.end_of_body {
                loop {
                    match requests.next().await {
                        Some(Ok(ServerFrame {
                            msg: Some(server_frame::Msg::Data(d)),
                        })) => len += d.data.len(),
                        Some(Ok(ServerFrame {
                            msg: Some(server_frame::Msg::EndOfBody(_)),
                        })) => break,
                        _ => return,
                    }
                }
            }
            let reply = format!("{} {} {len}", head.method, head.path_and_query);
            let frame = AgentFrame {
                msg: Some(agent_frame::Msg::ResponseHead(ResponseHead {
                    status: 200,
                    headers: vec![],
                    body: Bytes::from(reply),
                    end_of_body: true,
                })),
            };
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
        }
    });
}

struct Gw {
    url: String,
    registry: Arc<TunnelRegistry>,
    replica: Option<ReplicaGuard>,
    key: Arc<str>,
    stop: watch::Sender<bool>,
    served: tokio::task::JoinHandle<()>,
}

/// A gateway kas holding one connection of the agent with two idle tunnels.
async fn gateway() -> Gw {
    let registry = TunnelRegistry::new();
    let replica = registry.add_replica(
        AGENT,
        ReplicaInfo {
            replica_id: "agentk-1".into(),
            agent_version: "test".into(),
            peer: "test".into(),
            meta: Default::default(),
        },
    );
    let key = replica.connection_key().clone();
    offer_tunnel(&registry, &key);
    offer_tunnel(&registry, &key);
    let (stop, stop_rx) = watch::channel(false);
    let svc = GatewayService::new(registry.clone(), stop_rx.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let incoming = TcpListenerStream::new(listener);
    let mut rx = stop_rx;
    let stopped = async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let served = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(GatewayServer::new(svc))
            .serve_with_incoming_shutdown(incoming, stopped)
            .await;
    });
    Gw {
        url,
        registry,
        replica: Some(replica),
        key,
        stop,
        served,
    }
}

fn peers() -> Peers {
    Peers::new(Arc::new(
        PrivateAuth::new(&[7u8; 32], "kas-routing").expect("secret"),
    ))
}

fn head(method: &str, path: &str, end_of_body: bool) -> RequestHead {
    RequestHead {
        method: method.into(),
        path_and_query: path.into(),
        end_of_body,
        ..Default::default()
    }
}

/// One exchange the way the proxy does it; the response body as text.
async fn exchange(
    peers: &Peers,
    gw: &Gw,
    body: Option<&'static str>,
) -> Result<String, ExchangeError> {
    let run = async {
        let tunnel = peers
            .open(&gw.url, AGENT, &gw.key, body.is_some())
            .await
            .map_err(|e| ExchangeError::Protocol(e.to_string()))?;
        let (rhead, mut rbody) = match body {
            None => {
                tunnel
                    .round_trip(head("GET", "/api/v1/pods", true), Empty::<Bytes>::new())
                    .await?
            }
            Some(b) => {
                tunnel
                    .round_trip(
                        head("POST", "/api/v1/configmaps", false),
                        Full::new(Bytes::from(b)),
                    )
                    .await?
            }
        };
        assert_eq!(rhead.status, 200);
        let mut text = Vec::new();
        while let Some(chunk) = rbody.next_chunk().await? {
            text.extend_from_slice(&chunk);
        }
        Ok(String::from_utf8_lossy(&text).into_owned())
    };
    tokio::time::timeout(LIMIT, run)
        .await
        .expect("the exchange did not finish in time")
}

#[tokio::test]
async fn forwarded_exchanges_reuse_their_streams() {
    let gw = gateway().await;
    let peers = peers();
    for _ in 0..20 {
        assert_eq!(
            exchange(&peers, &gw, None).await.expect("GET"),
            "GET /api/v1/pods 0"
        );
    }
    let s = peers.stats();
    assert_eq!((s.exchanges, s.streams_opened, s.idle_streams), (20, 1, 1));

    // A request with a body cannot be sent twice, so it never takes a stream that may
    // have just ended: it opens one and waits for the gateway to accept it. That
    // stream is kept afterwards too.
    let posted = exchange(&peers, &gw, Some("hello")).await.expect("POST");
    assert_eq!(posted, "POST /api/v1/configmaps 5");
    let s = peers.stats();
    assert_eq!((s.exchanges, s.streams_opened, s.idle_streams), (21, 2, 2));

    // Two at once use the two idle streams.
    let (a, b) = tokio::join!(exchange(&peers, &gw, None), exchange(&peers, &gw, None));
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    let s = peers.stats();
    assert_eq!((s.exchanges, s.streams_opened, s.idle_streams), (23, 2, 2));
}

#[tokio::test]
async fn a_stream_whose_connection_went_away_fails_before_the_response() {
    let mut gw = gateway().await;
    let peers = peers();
    exchange(&peers, &gw, None).await.expect("GET");
    assert_eq!(peers.stats().idle_streams, 1);
    // The agent connection leaves the gateway; the idle stream still names it.
    drop(gw.replica.take());
    assert!(!gw.registry.is_connected(AGENT));
    // The tunnel closes before a response head: what the proxy retries elsewhere.
    match exchange(&peers, &gw, None).await {
        Err(ExchangeError::TunnelClosed) => {}
        other => panic!("expected the tunnel to close, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stopping_gateway_ends_its_idle_streams() {
    let mut gw = gateway().await;
    let peers = peers();
    let (a, b) = tokio::join!(exchange(&peers, &gw, None), exchange(&peers, &gw, None));
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    assert_eq!(peers.stats().idle_streams, 2);
    // Graceful shutdown waits for open streams; idle ones must not hold it up.
    gw.stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), &mut gw.served)
        .await
        .expect("the gateway kept serving its idle streams")
        .expect("server task");
    // The routing side does not hand out the ended streams.
    match exchange(&peers, &gw, None).await {
        Err(ExchangeError::TunnelClosed) => {}
        other => panic!("expected the tunnel to close, got {other:?}"),
    }
}
