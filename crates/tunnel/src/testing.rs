//! A tunnel's agent end made of channels, for tests that drive kas's side in memory
//! (feature `testing`): what kas sends arrives on [`FakeAgentEnd::from_kas`], and
//! frames the test sends are what kas reads. Compiled for this crate's tests and, with
//! the feature, for other crates' tests; never in a release build of kas.

use crate::{outbound_channel, Inbound, Outbound, OutboundStream};
use bytes::Bytes;
use futures::StreamExt;
use kas_proto::v1::{
    agent_frame, server_frame, AgentFrame, RequestHead, ResponseHead, ServerFrame,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// The agent's end of one in-memory tunnel.
pub struct FakeAgentEnd {
    pub from_kas: OutboundStream,
    pub to_kas: mpsc::UnboundedSender<Result<AgentFrame, tonic::Status>>,
}

/// A new in-memory tunnel: kas's two directions and the agent's end.
pub fn tunnel() -> (Inbound, Outbound, FakeAgentEnd) {
    let (out, from_kas) = outbound_channel(8);
    let (to_kas, rx) = mpsc::unbounded_channel();
    let inbound: Inbound = Box::pin(UnboundedReceiverStream::new(rx));
    (inbound, out, FakeAgentEnd { from_kas, to_kas })
}

impl FakeAgentEnd {
    /// The next request head kas sent; panics on anything else (a test's failure).
    pub async fn request(&mut self) -> RequestHead {
        match self.from_kas.next().await {
            Some(Ok(ServerFrame {
                msg: Some(server_frame::Msg::RequestHead(h)),
            })) => h,
            other => panic!("expected a request head, got {other:?}"),
        }
    }

    /// Answers with a whole small response in the head.
    pub fn respond(&self, status: u32, body: &str) {
        self.send(agent_frame::Msg::ResponseHead(ResponseHead {
            status,
            body: Bytes::copy_from_slice(body.as_bytes()),
            end_of_body: true,
            ..Default::default()
        }));
    }

    /// Sends a frame to kas; a kas end that is gone already is not an error here.
    pub fn send(&self, msg: agent_frame::Msg) {
        let _ = self.to_kas.send(Ok(AgentFrame { msg: Some(msg) }));
    }
}
