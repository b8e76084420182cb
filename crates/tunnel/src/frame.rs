//! The frames both ends send, and the two ways bytes become frames: an HTTP body
//! pumped into Data frames ([`pump_body`]) and, after a 101, an upgraded connection
//! spliced both ways ([`splice`]). kas (towards the agent) and agentk (towards kas) use
//! the same code through [`FrameSink`], which each direction implements.

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;
use kas_proto::v1::{agent_frame, server_frame, AgentFrame, Data, EndOfBody, ServerFrame};
use kas_proto::MAX_DATA_FRAME;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes read from an upgraded connection at once (and so the largest Data frame a
/// splice sends).
const SPLICE_READ: usize = 32 * 1024;

/// One direction of a tunnel, as far as bodies are concerned.
pub trait FrameSink: Send + Sync {
    /// Sends a Data frame; false once the tunnel is gone.
    fn data(&self, data: Bytes) -> impl std::future::Future<Output = bool> + Send;
    /// Sends EndOfBody (the half-close of this direction); false once the tunnel is gone.
    fn end(&self) -> impl std::future::Future<Output = bool> + Send;
    /// The body being sent failed midway: tell the other end the exchange is broken.
    fn abort(&self, reason: &str) -> impl std::future::Future<Output = ()> + Send;
}

/// A Data frame from kas.
pub fn server_data(data: Bytes) -> ServerFrame {
    ServerFrame {
        msg: Some(server_frame::Msg::Data(Data { data })),
    }
}

/// EndOfBody from kas.
pub fn server_end() -> ServerFrame {
    ServerFrame {
        msg: Some(server_frame::Msg::EndOfBody(EndOfBody {})),
    }
}

/// A frame from the agent.
pub fn agent(msg: agent_frame::Msg) -> AgentFrame {
    AgentFrame { msg: Some(msg) }
}

/// Why [`pump_body`] stopped before the end of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PumpError {
    /// The tunnel went away.
    Closed,
    /// The body failed (its error, for logs); the sink was told with [`FrameSink::abort`].
    Body(String),
}

/// Streams `body` as Data frames of at most [`MAX_DATA_FRAME`] bytes, then EndOfBody.
/// Waits on the sink for capacity, so a slow receiver slows the sender down instead of
/// anything being buffered. Trailers are not forwarded.
pub async fn pump_body<B, S>(body: B, sink: &S) -> Result<(), PumpError>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
    S: FrameSink,
{
    let mut body = std::pin::pin!(body);
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else {
                    continue;
                };
                while !data.is_empty() {
                    let chunk = data.split_to(data.len().min(MAX_DATA_FRAME));
                    if !sink.data(chunk).await {
                        return Err(PumpError::Closed);
                    }
                }
            }
            Some(Err(e)) => {
                let e = e.to_string();
                sink.abort(&e).await;
                return Err(PumpError::Body(e));
            }
            None => {
                return match sink.end().await {
                    true => Ok(()),
                    false => Err(PumpError::Closed),
                }
            }
        }
    }
}

/// Copies an upgraded connection both ways through a tunnel until both directions
/// have ended: bytes read from `io` go to `sink` as Data frames (EndOfBody when `io`
/// reaches its end), and every chunk `incoming` yields is written to `io` (shut down
/// for writing when `incoming` ends). Returns once both directions are done; the
/// caller owns `incoming`, so the tunnel stays open until then.
pub async fn splice<IO, S, In>(io: IO, sink: &S, incoming: &mut In)
where
    IO: AsyncRead + AsyncWrite,
    S: FrameSink,
    In: futures::Stream<Item = Bytes> + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let up = async {
        let mut buf = vec![0u8; SPLICE_READ];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    sink.end().await;
                    return;
                }
                Ok(n) => {
                    if !sink.data(Bytes::copy_from_slice(&buf[..n])).await {
                        return;
                    }
                }
            }
        }
    };
    let down = async {
        while let Some(chunk) = futures::StreamExt::next(incoming).await {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::join!(up, down);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};
    use std::sync::Mutex;

    /// Records what was sent.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl FrameSink for Recorder {
        async fn data(&self, data: Bytes) -> bool {
            let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
            v.push(format!("data {}", data.len()));
            true
        }
        async fn end(&self) -> bool {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push("end".into());
            true
        }
        async fn abort(&self, reason: &str) {
            let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
            v.push(format!("abort {reason}"));
        }
    }

    impl Recorder {
        fn sent(&self) -> Vec<String> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
    }

    #[tokio::test]
    async fn bodies_are_cut_into_frames_of_at_most_the_maximum() {
        let r = Recorder::default();
        let body = Full::new(Bytes::from(vec![7u8; MAX_DATA_FRAME * 2 + 5]));
        assert_eq!(pump_body(body, &r).await, Ok(()));
        let max = format!("data {MAX_DATA_FRAME}");
        assert_eq!(r.sent(), [max.as_str(), max.as_str(), "data 5", "end"]);
    }

    #[tokio::test]
    async fn a_failing_body_aborts_the_exchange() {
        let r = Recorder::default();
        let chunks: Vec<Result<http_body::Frame<Bytes>, String>> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"abc"))),
            Err("disk on fire".into()),
        ];
        let body = StreamBody::new(futures::stream::iter(chunks));
        assert_eq!(
            pump_body(body, &r).await,
            Err(PumpError::Body("disk on fire".into()))
        );
        assert_eq!(r.sent(), ["data 3", "abort disk on fire"]);
    }

    #[tokio::test]
    async fn a_splice_copies_both_ways_and_half_closes() {
        let (near, mut far) = tokio::io::duplex(1024);
        let r = Recorder::default();
        let mut from_tunnel = futures::stream::iter([Bytes::from_static(b"from the tunnel")]);
        let peer = async {
            far.write_all(b"hello").await.expect("write");
            far.shutdown().await.expect("shutdown");
            let mut got = Vec::new();
            far.read_to_end(&mut got).await.expect("read");
            got
        };
        let (_, got) = tokio::join!(splice(near, &r, &mut from_tunnel), peer);
        assert_eq!(got, b"from the tunnel");
        assert_eq!(r.sent(), ["data 5", "end"]);
    }
}
