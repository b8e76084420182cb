//! The proxy request path: authenticate, authorize, pick a tunnel, stream.

use crate::audit::{AuditIdentity, AuditRecord, AuditedBody};
use crate::status::status_response;
use crate::token::parse_ci_token;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use kas_authz::{decide, Decision, Identity};
use kas_controlplane::ControlPlane;
use kas_proto::v1::{
    server_frame, Data, EndOfBody, ExtraValues, Impersonation, RequestHead, ServerFrame,
};
use kas_proto::MAX_DATA_FRAME;
use kas_router::Router;
use kas_tunnel::{headers, AcquireError, ExchangeError, TunnelBody};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Response body of the proxy: a Status document or a tunnel's stream.
pub type ProxyBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Tunable behaviour.
#[derive(Clone)]
pub struct ProxyOptions {
    /// How long a request waits for a free tunnel of its agent.
    pub agent_wait: Duration,
    /// Told about every request once its response head is ready (metrics).
    pub observer: Option<Arc<dyn ProxyObserver>>,
    /// Receives one audit record per authorized request, when its response ends.
    pub audit: Option<Arc<dyn crate::audit::AuditSink>>,
}

impl std::fmt::Debug for ProxyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyOptions")
            .field("agent_wait", &self.agent_wait)
            .field("observer", &self.observer.is_some())
            .field("audit", &self.audit.is_some())
            .finish()
    }
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            agent_wait: Duration::from_secs(20),
            observer: None,
            audit: None,
        }
    }
}

/// What the proxy reports about one request.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The `access_as` mode, once the request was authorized.
    pub access_as: Option<&'static str>,
    /// Why no response came from the agent, if so: `agent_not_connected`,
    /// `agent_busy`, `refused_by_agent`, `upstream_unavailable`, `tunnel_broken` or
    /// `control_plane`.
    pub failure: Option<&'static str>,
}

/// Receives one call per proxied request (status, what was observed, time to head).
pub trait ProxyObserver: Send + Sync {
    fn request(&self, status: u16, observed: &Observed, head_time: Duration);
}

/// The failure code of an exchange failure (metrics and logs).
pub fn failure_code(e: &ExchangeFailure) -> &'static str {
    match e {
        ExchangeFailure::NotConnected(_) => "agent_not_connected",
        ExchangeFailure::NoFreeTunnel(_) => "agent_busy",
        ExchangeFailure::Refused(_) => "refused_by_agent",
        ExchangeFailure::Agent(_) => "upstream_unavailable",
        ExchangeFailure::Broken => "tunnel_broken",
    }
}

/// The Kubernetes API proxy for CI jobs.
pub struct K8sProxy {
    cp: Arc<dyn ControlPlane>,
    router: Arc<Router>,
    opts: ProxyOptions,
}

/// The path prefix of the proxy endpoint (`https://<kas>/k8s-proxy/`); requests
/// without it are accepted too, so kas can sit behind a path-stripping ingress.
const PREFIX: &str = "/k8s-proxy";

/// Attempts on a fresh tunnel when one breaks before the agent answered.
const ATTEMPTS: usize = 3;

fn to_proto(id: &Identity) -> Impersonation {
    Impersonation {
        username: id.username.clone(),
        uid: id.uid.clone().unwrap_or_default(),
        groups: id.groups.clone(),
        extra: id
            .extra
            .iter()
            .map(|(k, v)| ExtraValues {
                key: k.clone(),
                values: v.clone(),
            })
            .collect(),
    }
}

/// The path a client asked for, as the cluster sees it: without the proxy's
/// `/k8s-proxy` prefix (when it is a whole path segment), always starting with `/`.
pub fn upstream_path(path_and_query: &str) -> String {
    match path_and_query.strip_prefix(PREFIX) {
        Some(rest) if rest.is_empty() || rest.starts_with(['/', '?']) => {
            if rest.starts_with('/') {
                rest.to_string()
            } else {
                format!("/{rest}")
            }
        }
        _ if path_and_query.starts_with('/') => path_and_query.to_string(),
        _ => format!("/{path_and_query}"),
    }
}

/// The request head sent to the agent for a client's request: method, path without
/// the proxy prefix, the client's headers without credentials, impersonation or
/// hop-by-hop headers, and the identity kas decided (never one the client sent).
pub fn upstream_head<B: Body>(
    req: &Request<B>,
    identity: Option<&Identity>,
    request_id: &str,
) -> RequestHead {
    let upgrade = is_upgrade(req);
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    RequestHead {
        method: req.method().as_str().to_string(),
        path_and_query: upstream_path(path_and_query),
        headers: headers::to_wire(req.headers(), true, upgrade),
        impersonation: identity.map(to_proto),
        upgrade,
        request_id: request_id.to_string(),
        end_of_body: !upgrade && req.body().is_end_stream(),
        service: None,
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

fn internal() -> Response<ProxyBody> {
    status_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "kas could not process the request; see kas logs",
    )
}

impl K8sProxy {
    pub fn new(cp: Arc<dyn ControlPlane>, router: Arc<Router>, opts: ProxyOptions) -> Arc<Self> {
        Arc::new(K8sProxy { cp, router, opts })
    }

    /// Handles one client request.
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let started = Instant::now();
        let mut observed = Observed::default();
        let resp = self.clone().serve(req, &mut observed).await;
        if let Some(o) = &self.opts.observer {
            o.request(resp.status().as_u16(), &observed, started.elapsed());
        }
        resp
    }

    async fn serve<B>(
        self: Arc<Self>,
        mut req: Request<B>,
        observed: &mut Observed,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let started = Instant::now();
        let arrived = crate::audit::now_unix();
        let request_id = format!("{:016x}", rand::random::<u64>());
        // WebSocket clients that cannot set headers send the token as a subprotocol
        // (kube-apiserver accepts it too); it is stripped before forwarding either way.
        let ws_bearer = match req.headers().get(header::AUTHORIZATION) {
            None if is_upgrade(&req) => {
                headers::websocket_bearer(req.headers()).map(|t| format!("Bearer {t}"))
            }
            _ => None,
        };
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or(""))
            .or(ws_bearer.as_deref());
        let token = match parse_ci_token(auth) {
            Ok(t) => t,
            Err(e) => {
                let code = StatusCode::UNAUTHORIZED;
                tracing::info!(%request_id, status = 401, reason = %e, "k8s-proxy: refused");
                return status_response(code, &e.to_string());
            }
        };
        let agent_id = token.agent_id;
        let job = match self.cp.authenticate_job(token.job_token).await {
            Ok(Some(j)) => j,
            Ok(None) => {
                tracing::info!(%request_id, agent_id, status = 401, "k8s-proxy: unknown or finished job token");
                return status_response(
                    StatusCode::UNAUTHORIZED,
                    "the job token is invalid or the job is no longer running",
                );
            }
            Err(e) => {
                tracing::error!(%request_id, agent_id, error = %e, "k8s-proxy: control plane lookup failed");
                observed.failure = Some("control_plane");
                return status_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "kas cannot reach its control plane; retry later",
                );
            }
        };
        let agent = match self.cp.agent_info(agent_id).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(%request_id, agent_id, job_id = job.job_id, project = %job.project.path, error = %e, "k8s-proxy: control plane lookup failed");
                observed.failure = Some("control_plane");
                return status_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "kas cannot reach its control plane; retry later",
                );
            }
        };
        let decision = match &agent {
            Some(a) => decide(&a.agent, &a.config, &job),
            None => Decision::Deny(kas_authz::DenyReason::NotAuthorized {
                project: job.project.path.clone(),
            }),
        };
        let allowed = match decision {
            Decision::Allow(a) => {
                observed.access_as = Some(a.mode.as_str());
                a
            }
            Decision::Deny(reason) => {
                tracing::info!(%request_id, agent_id, job_id = job.job_id, project = %job.project.path, status = 403, %reason, "k8s-proxy: forbidden");
                if let Some(sink) = &self.opts.audit {
                    let pq = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.as_str())
                        .unwrap_or("/");
                    let pq = pq.strip_prefix(PREFIX).unwrap_or(pq);
                    let mut r = audit_record(
                        &job,
                        agent_id,
                        &request_id,
                        arrived,
                        req.method().as_str(),
                        pq,
                        403,
                    );
                    r.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
                    sink.record(r);
                }
                return status_response(
                    StatusCode::FORBIDDEN,
                    &format!("forbidden: agent {agent_id} may not be used by this job: {reason}"),
                );
            }
        };

        let head = upstream_head(&req, allowed.identity.as_ref(), &request_id);
        let upgrade = head.upgrade;
        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        // A request without a body can be replayed on another tunnel if one breaks.
        let replayable = upgrade || head.end_of_body;
        let body = req.into_body();

        let outcome = exchange(
            &self.router,
            agent_id,
            &head,
            body,
            replayable,
            self.opts.agent_wait,
        )
        .await;
        // The audit record of an authorized request, once its code is known.
        let decided = |code: u16| {
            let mut r = audit_record(
                &job,
                agent_id,
                &request_id,
                arrived,
                &head.method,
                &head.path_and_query,
                code,
            );
            r.access_as = allowed.mode.as_str().to_string();
            r.impersonated = audit_identity(&allowed);
            r
        };
        let (rhead, tbody) = match outcome {
            Ok(x) => x,
            Err(e) => {
                observed.failure = Some(failure_code(&e));
                let code = e.status();
                if let Some(sink) = &self.opts.audit {
                    let mut r = decided(code.as_u16());
                    r.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
                    sink.record(r);
                }
                tracing::warn!(%request_id, agent_id, job_id = job.job_id, project = %job.project.path, error = %e, status = code.as_u16(), "k8s-proxy: no response from the agent");
                return status_response(code, &e.to_string());
            }
        };
        let Ok(status) = StatusCode::from_u16(rhead.status as u16) else {
            return internal();
        };
        let mut resp_headers = headers::from_wire(&rhead.headers, false);
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            resp_headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        }
        tracing::info!(
            %request_id, agent_id, job_id = job.job_id, project = %job.project.path,
            access_as = allowed.mode.as_str(), method = %head.method, path = %head.path_and_query,
            status = status.as_u16(), head_ms = started.elapsed().as_secs_f64() * 1000.0,
            "k8s-proxy: request"
        );
        let audit = self.opts.audit.clone().map(|sink| {
            let mut record = decided(status.as_u16());
            record.completed = false;
            (record, sink)
        });
        let mut resp = if switching {
            if let Some((mut record, sink)) = audit {
                record.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
                record.completed = true;
                sink.record(record);
            }
            match on_upgrade {
                Some(on) => {
                    tokio::spawn(splice(on, tbody, request_id));
                    Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync())
                }
                None => return internal(),
            }
        } else {
            let body = tbody.map_err(Into::into).boxed_unsync();
            match audit {
                Some((record, sink)) => {
                    Response::new(AuditedBody::new(body, record, sink, started).boxed_unsync())
                }
                None => Response::new(body),
            }
        };
        *resp.status_mut() = status;
        *resp.headers_mut() = resp_headers;
        resp
    }
}

/// An audit record for `job`'s request, before the outcome is known (access_as
/// `none`, no identity: the caller fills in what was decided).
fn audit_record(
    job: &kas_authz::JobContext,
    agent_id: u64,
    request_id: &str,
    arrived: f64,
    method: &str,
    path_and_query: &str,
    code: u16,
) -> AuditRecord {
    AuditRecord {
        time: arrived,
        request_id: request_id.to_string(),
        job_id: job.job_id,
        pipeline_id: job.pipeline_id,
        project: job.project.path.clone(),
        environment: job.environment.as_ref().map(|e| e.name.clone()),
        user: job.username.clone(),
        agent_id,
        access_as: "none".into(),
        impersonated: None,
        verb: crate::audit::verb(method, path_and_query).to_string(),
        path: path_and_query
            .split('?')
            .next()
            .unwrap_or_default()
            .to_string(),
        code,
        bytes: 0,
        duration_ms: 0.0,
        completed: true,
    }
}

fn audit_identity(allowed: &kas_authz::Allowed) -> Option<AuditIdentity> {
    allowed.identity.as_ref().map(|i| AuditIdentity {
        username: i.username.clone(),
        uid: i.uid.clone(),
        groups: i.groups.clone(),
        extra: i.extra.iter().cloned().collect(),
    })
}

/// Copies raw bytes both ways between an upgraded client connection and the tunnel.
async fn splice(on: hyper::upgrade::OnUpgrade, mut from_agent: TunnelBody, request_id: String) {
    let upgraded = match on.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(%request_id, error = %e, "k8s-proxy: client upgrade failed");
            return;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
    let Some(out) = from_agent.outbound() else {
        return;
    };
    let up = async move {
        let mut buf = vec![0u8; MAX_DATA_FRAME.min(32 * 1024)];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    out.send(ServerFrame {
                        msg: Some(server_frame::Msg::EndOfBody(EndOfBody {})),
                    })
                    .await;
                    return;
                }
                Ok(n) => {
                    let f = ServerFrame {
                        msg: Some(server_frame::Msg::Data(Data {
                            data: Bytes::copy_from_slice(&buf[..n]),
                        })),
                    };
                    if !out.send(f).await {
                        return;
                    }
                }
            }
        }
    };
    let down = async move {
        while let Ok(Some(chunk)) = from_agent.next_chunk().await {
            if wr.write_all(&chunk).await.is_err() {
                return from_agent;
            }
        }
        let _ = wr.shutdown().await;
        // Keep the tunnel open until the other direction finishes.
        from_agent
    };
    let (_, tunnel) = tokio::join!(up, down);
    drop(tunnel);
}

/// Why an exchange through an agent produced no response.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeFailure {
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

impl ExchangeFailure {
    /// The HTTP status a client gets for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            ExchangeFailure::NotConnected(_) | ExchangeFailure::NoFreeTunnel(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ExchangeFailure::Refused(_) => StatusCode::FORBIDDEN,
            ExchangeFailure::Agent(_) | ExchangeFailure::Broken => StatusCode::BAD_GATEWAY,
        }
    }
}

/// Sends one request to `agent_id` through the router and waits for the response head.
/// A request without a body (`replayable`) is retried on another tunnel when one
/// breaks before the agent answered. Used by the CI proxy and the application API.
pub async fn exchange<B>(
    router: &Router,
    agent_id: u64,
    head: &RequestHead,
    body: B,
    replayable: bool,
    wait: Duration,
) -> Result<(kas_proto::v1::ResponseHead, TunnelBody), ExchangeFailure>
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
        let tunnel = router
            .acquire(agent_id, wait, &broken, replayable)
            .await
            .map_err(|e| match e {
                AcquireError::NotConnected => ExchangeFailure::NotConnected(agent_id),
                AcquireError::NoFreeTunnel => ExchangeFailure::NoFreeTunnel(agent_id),
            })?;
        let label: Arc<str> = Arc::from(tunnel.replica());
        let res = if replayable {
            tunnel.round_trip(head.clone(), Empty::<Bytes>::new()).await
        } else {
            match body.take() {
                Some(b) => tunnel.round_trip(head.clone(), b).await,
                None => return Err(ExchangeFailure::Broken),
            }
        };
        match res {
            Ok(x) => return Ok(x),
            Err(ExchangeError::TunnelClosed) if replayable && attempt < ATTEMPTS => {
                broken.push(label);
            }
            Err(ExchangeError::Agent { code, message })
                if code == kas_proto::v1::tunnel_error::Code::Forbidden as i32 =>
            {
                return Err(ExchangeFailure::Refused(message))
            }
            Err(ExchangeError::Agent { message, .. }) => {
                return Err(ExchangeFailure::Agent(message))
            }
            Err(_) => return Err(ExchangeFailure::Broken),
        }
    }
}
