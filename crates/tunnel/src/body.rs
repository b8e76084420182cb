//! The agent's answer through a tunnel, as kas reads it: its Data frames presented as
//! an HTTP body.

use crate::registry::{BusyGuard, Outbound, Reuse};
use crate::ExchangeError;
use crate::Inbound;
use bytes::Bytes;
use futures::Stream;
use http_body::{Body, Frame};
use kas_proto::v1::{agent_frame, AgentFrame};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio_util::task::AbortOnDropHandle;

/// The agent's side of an exchange: response body frames, or after a 101 the raw
/// bytes from the upstream. Dropping it ends the tunnel (the agent cancels).
pub struct TunnelBody {
    /// Both halves are taken when the tunnel goes back to the pool.
    inbound: Option<Inbound>,
    outbound: Option<Outbound>,
    _pump: Option<AbortOnDropHandle<()>>,
    busy: Option<BusyGuard>,
    reuse: Option<Reuse>,
    /// A body that came inline in the response head.
    inline: Option<Bytes>,
    done: bool,
}

impl TunnelBody {
    pub(crate) fn new(
        inbound: Inbound,
        outbound: Outbound,
        pump: Option<AbortOnDropHandle<()>>,
        busy: BusyGuard,
        reuse: Option<Reuse>,
        inline: Option<Bytes>,
    ) -> Self {
        let mut body = TunnelBody {
            inbound: Some(inbound),
            outbound: Some(outbound),
            _pump: pump,
            busy: Some(busy),
            reuse,
            inline: None,
            done: false,
        };
        if let Some(b) = inline {
            // The whole response is here: the tunnel is free again at once.
            body.done = true;
            body.give_back();
            body.inline = (!b.is_empty()).then_some(b);
        }
        body
    }

    /// The kas -> agent direction, for raw bytes after a 101 response.
    pub fn outbound(&self) -> Option<Outbound> {
        self.outbound.clone()
    }

    /// Next chunk from the agent; `Ok(None)` at EndOfBody.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ExchangeError> {
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, ExchangeError>> {
        if let Some(b) = self.inline.take() {
            return Poll::Ready(Ok(Some(b)));
        }
        if self.done {
            return Poll::Ready(Ok(None));
        }
        let Some(inbound) = self.inbound.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        loop {
            let item = match Pin::new(&mut *inbound).poll_next(cx) {
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
                    self.give_back();
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

    /// A clean exchange is over: the tunnel serves the next request.
    fn give_back(&mut self) {
        if let (Some(reuse), Some(inbound), Some(outbound)) =
            (self.reuse.take(), self.inbound.take(), self.outbound.take())
        {
            self.busy = None;
            reuse.give_back(inbound, outbound);
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
        self.done && self.inline.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match (&self.inline, self.done) {
            (Some(b), _) => http_body::SizeHint::with_exact(b.len() as u64),
            (None, true) => http_body::SizeHint::with_exact(0),
            (None, false) => http_body::SizeHint::default(),
        }
    }
}
