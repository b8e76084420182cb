//! Bodies through a tunnel: an HTTP body pumped into Data frames, and the agent's
//! Data frames presented as an HTTP body.

use crate::registry::{AbortOnDrop, BusyGuard, Outbound};
use crate::ExchangeError;
use bytes::Bytes;
use futures::Stream;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use kas_proto::v1::{agent_frame, server_frame, AgentFrame, Data, EndOfBody, ServerFrame};
use kas_proto::MAX_DATA_FRAME;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::{Status, Streaming};

/// Streams `body` as Data frames of at most [`MAX_DATA_FRAME`] bytes, then EndOfBody.
/// Waits on the channel for capacity, so a slow agent slows the client down instead
/// of buffering. A failing body cancels the stream.
pub async fn frames_from_body<B>(body: B, out: Outbound)
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display + Send,
{
    let mut body = std::pin::pin!(body);
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else {
                    continue; // trailers are not forwarded
                };
                while !data.is_empty() {
                    let chunk = data.split_to(data.len().min(MAX_DATA_FRAME));
                    let f = ServerFrame {
                        msg: Some(server_frame::Msg::Data(Data { data: chunk })),
                    };
                    if out.send(Ok(f)).await.is_err() {
                        return;
                    }
                }
            }
            Some(Err(e)) => {
                let e = e.to_string();
                tracing::debug!(error = %e, "request body failed; cancelling the exchange");
                let _ = out
                    .send(Err(Status::cancelled("request body failed")))
                    .await;
                return;
            }
            None => {
                let f = ServerFrame {
                    msg: Some(server_frame::Msg::EndOfBody(EndOfBody {})),
                };
                let _ = out.send(Ok(f)).await;
                return;
            }
        }
    }
}

/// The agent's side of an exchange: response body frames, or after a 101 the raw
/// bytes from the upstream. Dropping it ends the tunnel (the agent cancels).
pub struct TunnelBody {
    inbound: Streaming<AgentFrame>,
    outbound: Outbound,
    _pump: Option<AbortOnDrop<()>>,
    _busy: BusyGuard,
    done: bool,
}

impl TunnelBody {
    pub(crate) fn new(
        inbound: Streaming<AgentFrame>,
        outbound: Outbound,
        pump: Option<AbortOnDrop<()>>,
        busy: BusyGuard,
    ) -> Self {
        TunnelBody {
            inbound,
            outbound,
            _pump: pump,
            _busy: busy,
            done: false,
        }
    }

    /// The kas -> agent direction, for raw bytes after a 101 response.
    pub fn outbound(&self) -> Outbound {
        self.outbound.clone()
    }

    /// Next chunk from the agent; `Ok(None)` at EndOfBody.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ExchangeError> {
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, ExchangeError>> {
        if self.done {
            return Poll::Ready(Ok(None));
        }
        loop {
            let item = match Pin::new(&mut self.inbound).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(i) => i,
            };
            return Poll::Ready(match item {
                Some(Ok(AgentFrame {
                    msg: Some(agent_frame::Msg::Data(d)),
                })) => {
                    if d.data.is_empty() {
                        continue;
                    }
                    Ok(Some(d.data))
                }
                Some(Ok(AgentFrame {
                    msg: Some(agent_frame::Msg::EndOfBody(_)),
                })) => {
                    self.done = true;
                    Ok(None)
                }
                Some(Ok(AgentFrame {
                    msg: Some(agent_frame::Msg::Error(e)),
                })) => {
                    self.done = true;
                    Err(ExchangeError::from_proto(e))
                }
                Some(Ok(other)) => {
                    self.done = true;
                    Err(ExchangeError::Protocol(format!(
                        "unexpected frame in body: {other:?}"
                    )))
                }
                Some(Err(_)) | None => {
                    self.done = true;
                    Err(ExchangeError::TunnelClosed)
                }
            });
        }
    }
}

impl Body for TunnelBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = self.get_mut();
        match this.poll_chunk(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
