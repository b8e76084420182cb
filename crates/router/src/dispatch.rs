//! Dispatching one request to an agent: a tunnel from [`AgentRouter::acquire`], the
//! exchange through it, and a retry on another tunnel when one breaks before the
//! agent answered and the request can be sent again. Every surface that reaches an
//! agent (the CI proxy, the application API, the agents page) goes through here.

use crate::AgentRouter;
use bytes::Bytes;
use http_body::Body;
use http_body_util::Empty;
use kas_api::error::{Error, Failure};
use kas_proto::v1::{tunnel_error, RequestHead, ResponseHead};
use kas_tunnel::{AcquireError, ExchangeError, TunnelBody};
use std::sync::Arc;
use std::time::Duration;

/// Attempts on a fresh tunnel when one breaks before the agent answered.
const ATTEMPTS: usize = 3;

/// Why an exchange through an agent produced no response.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("agent {0} is not connected to kas")]
    NotConnected(u64),
    #[error("agent {0} has no free tunnel; retry later")]
    NoFreeTunnel(u64),
    #[error("the agent refused the request: {0}")]
    Refused(String),
    #[error("the agent could not complete the request: {0}")]
    Agent(String),
    #[error("the agent's connection broke before it answered; retry")]
    Broken,
}

impl DispatchError {
    /// What the metrics count it as.
    pub fn failure(&self) -> Failure {
        match self {
            DispatchError::NotConnected(_) => Failure::AgentNotConnected,
            DispatchError::NoFreeTunnel(_) => Failure::AgentBusy,
            DispatchError::Refused(_) => Failure::RefusedByAgent,
            DispatchError::Agent(_) => Failure::UpstreamUnavailable,
            DispatchError::Broken => Failure::TunnelBroken,
        }
    }
}

impl From<DispatchError> for Error {
    fn from(e: DispatchError) -> Self {
        Error::failure(e.failure(), e.to_string())
    }
}

impl AgentRouter {
    /// Sends one request to `agent_id` and waits for the response head. A request
    /// without a body (`replayable`) is retried on another tunnel when one breaks
    /// before the agent answered.
    pub async fn dispatch<B>(
        &self,
        agent_id: u64,
        head: &RequestHead,
        body: B,
        replayable: bool,
        wait: Duration,
    ) -> Result<(ResponseHead, TunnelBody), DispatchError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let mut body = Some(body);
        let mut attempt = 0;
        // Tunnels that broke for this request; the router avoids them when it can.
        let mut broken: Vec<Arc<str>> = Vec::new();
        loop {
            attempt += 1;
            let tunnel = self
                .acquire(agent_id, wait, &broken, replayable)
                .await
                .map_err(|e| match e {
                    AcquireError::NotConnected => DispatchError::NotConnected(agent_id),
                    AcquireError::NoFreeTunnel => DispatchError::NoFreeTunnel(agent_id),
                })?;
            let label = tunnel.connection_key().clone();
            let res = if replayable {
                tunnel.round_trip(head.clone(), Empty::<Bytes>::new()).await
            } else {
                match body.take() {
                    Some(b) => tunnel.round_trip(head.clone(), b).await,
                    None => return Err(DispatchError::Broken),
                }
            };
            match res {
                Ok(x) => return Ok(x),
                Err(ExchangeError::TunnelClosed) if replayable && attempt < ATTEMPTS => {
                    broken.push(label);
                }
                Err(ExchangeError::Agent { code, message })
                    if code == tunnel_error::Code::Forbidden as i32 =>
                {
                    return Err(DispatchError::Refused(message))
                }
                Err(ExchangeError::Agent { message, .. }) => {
                    return Err(DispatchError::Agent(message))
                }
                Err(_) => return Err(DispatchError::Broken),
            }
        }
    }
}
