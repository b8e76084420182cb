//! The tunnel as kas receives it from an agent: gRPC-framed bytes decoded into agent
//! frames (tonic's framing with the project's codec), driven through one exchange
//! (request head out, response head and body in) and an upgrade. Whatever an agent
//! sends must end the exchange cleanly or with an error: no panic, no hang.
#![no_main]

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use kas_proto::codec::KasCodec;
use kas_proto::v1::{AgentFrame, RequestHead, ServerFrame};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock, Weak};
use tonic::codec::{Codec, Streaming};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

struct Discard;

impl kas_tunnel::TunnelPool for Discard {
    fn give_back(
        &self,
        _agent_id: u64,
        _label: &Arc<str>,
        _inbound: kas_tunnel::Inbound,
        _outbound: kas_tunnel::Outbound,
    ) {
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, frames)) = data.split_first() else {
        return;
    };
    runtime().block_on(async {
        let body = Full::new(Bytes::copy_from_slice(frames))
            .map_err(|never: std::convert::Infallible| -> tonic::Status { match never {} });
        let mut codec = KasCodec::<ServerFrame, AgentFrame>::default();
        let inbound: kas_tunnel::Inbound = Box::pin(Streaming::new_request(
            codec.decoder(),
            body,
            None,
            Some(kas_proto::MAX_MESSAGE_SIZE),
        ));
        let (out, mut sent) = kas_tunnel::outbound_channel(16);
        // No pool to return to: the tunnel is dropped after the exchange.
        let pool: Weak<dyn kas_tunnel::TunnelPool> = Weak::<Discard>::new();
        let tunnel = kas_tunnel::Tunnel::pooled(1, Arc::from("fuzz"), inbound, out, pool);
        let upgrade = mode & 1 == 1;
        let head = RequestHead {
            method: "GET".into(),
            path_and_query: "/api/v1/pods".into(),
            upgrade,
            end_of_body: !upgrade,
            ..Default::default()
        };
        // What kas sends is drained as the agent would read it.
        let drain = async { while futures::StreamExt::next(&mut sent).await.is_some() {} };
        let exchange = async {
            if let Ok((_head, mut body)) = tunnel.round_trip(head, Empty::<Bytes>::new()).await {
                // The frames are finite: the body ends, with or without an error.
                for _ in 0..10_000 {
                    match body.next_chunk().await {
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        };
        tokio::join!(exchange, async {
            tokio::time::timeout(std::time::Duration::from_millis(50), drain)
                .await
                .ok()
        });
    });
});
