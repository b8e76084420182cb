//! The proxy request path: authenticate, authorize, pick a tunnel, stream.

use crate::audit::{AuditRecord, AuditSink, AuditedBody};
use crate::status::status_response;
use crate::token::parse_ci_token;
use bytes::Bytes;
use futures::StreamExt;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use kas_api::error::{Error, Failure};
use kas_authz::{decide, Allowed, Decision, Identity, JobContext};
use kas_controlplane::ControlPlane;
use kas_proto::v1::{ExtraValues, Impersonation, RequestHead, ResponseHead};
use kas_router::AgentRouter;
use kas_tunnel::{headers, TunnelBody};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Why no response came from the agent, if so.
    pub failure: Option<Failure>,
}

/// Receives one call per proxied request (status, what was observed, time to head).
pub trait ProxyObserver: Send + Sync {
    fn request(&self, status: u16, observed: &Observed, head_time: Duration);
}

/// The Kubernetes API proxy for CI jobs.
pub struct K8sProxy {
    cp: Arc<dyn ControlPlane>,
    router: Arc<AgentRouter>,
    opts: ProxyOptions,
}

/// The path prefix of the proxy endpoint (`https://<kas>/k8s-proxy/`); requests
/// without it are accepted too, so kas can sit behind a path-stripping ingress.
const PREFIX: &str = "/k8s-proxy";

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

/// One request on its way through the proxy.
struct Ctx {
    started: Instant,
    /// Unix seconds (audit records).
    arrived: f64,
    request_id: String,
}

/// A request the job may make: who, through which agent, as whom.
struct Authorized {
    job: Arc<JobContext>,
    agent_id: u64,
    allowed: Allowed,
}

/// The `Authorization` a client sent: the header, or (for WebSocket clients that
/// cannot set headers) a bearer subprotocol, which kube-apiserver accepts too; it is
/// stripped before forwarding either way.
fn credentials<B>(req: &Request<B>) -> Option<String> {
    match req.headers().get(header::AUTHORIZATION) {
        Some(v) => Some(v.to_str().unwrap_or("").to_string()),
        None if is_upgrade(req) => {
            headers::websocket_bearer(req.headers()).map(|t| format!("Bearer {t}"))
        }
        None => None,
    }
}

impl K8sProxy {
    pub fn new(
        cp: Arc<dyn ControlPlane>,
        router: Arc<AgentRouter>,
        opts: ProxyOptions,
    ) -> Arc<Self> {
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
        let resp = self.serve(req, started, &mut observed).await;
        if let Some(o) = &self.opts.observer {
            o.request(resp.status().as_u16(), &observed, started.elapsed());
        }
        resp
    }

    async fn serve<B>(
        &self,
        req: Request<B>,
        started: Instant,
        observed: &mut Observed,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let ctx = Ctx {
            started,
            arrived: kas_api::clock::unix_secs_f64(),
            request_id: new_request_id(),
        };
        let authorized = match self.authenticate(&req, &ctx).await {
            Ok((job, agent_id)) => self.authorize(&req, job, agent_id, &ctx).await,
            Err(e) => Err(e),
        };
        match authorized {
            Ok(a) => {
                observed.access_as = Some(a.allowed.mode.as_str());
                // Boxed: its state is most of the request's (several KiB), and the
                // future returned by `handle` is moved a few times on its way into
                // hyper's connection task; small, those moves cost nothing.
                Box::pin(self.forward(req, a, ctx, observed)).await
            }
            Err(e) => {
                observed.failure = e.failure;
                status_response(&e)
            }
        }
    }

    /// The running job behind the request's credentials, and the agent it names.
    async fn authenticate<B>(
        &self,
        req: &Request<B>,
        ctx: &Ctx,
    ) -> Result<(Arc<JobContext>, u64), Error> {
        let request_id = &ctx.request_id;
        let auth = credentials(req);
        let token = parse_ci_token(auth.as_deref()).map_err(|e| {
            tracing::info!(%request_id, status = 401, reason = %e, "k8s-proxy: refused");
            Error::unauthenticated(e.to_string())
        })?;
        let agent_id = token.agent_id;
        match self.cp.authenticate_job(token.job_token).await {
            Ok(Some(j)) => Ok((j, agent_id)),
            Ok(None) => {
                tracing::info!(%request_id, agent_id, status = 401, "k8s-proxy: unknown or finished job token");
                Err(Error::unauthenticated(
                    "the job token is invalid or the job is no longer running",
                ))
            }
            Err(e) => {
                tracing::error!(%request_id, agent_id, error = %e, "k8s-proxy: control plane lookup failed");
                Err(Error::control_plane())
            }
        }
    }

    /// Whether the agent's `ci_access` lets the job use it (a refusal is audited).
    async fn authorize<B>(
        &self,
        req: &Request<B>,
        job: Arc<JobContext>,
        agent_id: u64,
        ctx: &Ctx,
    ) -> Result<Authorized, Error> {
        let request_id = &ctx.request_id;
        let agent = self.cp.agent_info(agent_id).await.map_err(|e| {
            tracing::error!(%request_id, agent_id, job_id = job.job_id, project = %job.project.path, error = %e, "k8s-proxy: control plane lookup failed");
            Error::control_plane()
        })?;
        let decision = match &agent {
            Some(a) => decide(&a.agent, &a.config, &job),
            None => Decision::Deny(kas_authz::DenyReason::NotAuthorized {
                project: job.project.path.clone(),
            }),
        };
        let reason = match decision {
            Decision::Allow(allowed) => {
                return Ok(Authorized {
                    job,
                    agent_id,
                    allowed,
                })
            }
            Decision::Deny(reason) => reason,
        };
        tracing::info!(%request_id, agent_id, job_id = job.job_id, project = %job.project.path, status = 403, %reason, "k8s-proxy: forbidden");
        if let Some(sink) = &self.opts.audit {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let pq = pq.strip_prefix(PREFIX).unwrap_or(pq);
            let mut r = audit_record(&job, agent_id, ctx, req.method().as_str(), pq, 403);
            r.duration_ms = ctx.started.elapsed().as_secs_f64() * 1000.0;
            sink.record(r);
        }
        Err(Error::forbidden(format!(
            "forbidden: agent {agent_id} may not be used by this job: {reason}"
        )))
    }

    /// Sends an authorized request through the agent and streams its answer back.
    async fn forward<B>(
        &self,
        mut req: Request<B>,
        a: Authorized,
        ctx: Ctx,
        observed: &mut Observed,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let head = upstream_head(&req, a.allowed.identity.as_ref(), &ctx.request_id);
        let on_upgrade = head.upgrade.then(|| hyper::upgrade::on(&mut req));
        // A request without a body can be replayed on another tunnel if one breaks.
        let replayable = head.upgrade || head.end_of_body;
        let outcome = self
            .router
            .dispatch(
                a.agent_id,
                &head,
                req.into_body(),
                replayable,
                self.opts.agent_wait,
            )
            .await;
        // The audit record of this request, once its code is known.
        let decided = |code: u16| {
            let mut r = audit_record(
                &a.job,
                a.agent_id,
                &ctx,
                &head.method,
                &head.path_and_query,
                code,
            );
            r.access_as = a.allowed.mode.as_str().to_string();
            r.impersonated = a.allowed.identity.as_ref().map(|i| i.to_api());
            r
        };
        let (rhead, tbody) = match outcome {
            Ok(x) => x,
            Err(e) => {
                let e = Error::from(e);
                observed.failure = e.failure;
                if let Some(sink) = &self.opts.audit {
                    let mut r = decided(e.http_status());
                    r.duration_ms = ctx.started.elapsed().as_secs_f64() * 1000.0;
                    sink.record(r);
                }
                tracing::warn!(request_id = %ctx.request_id, agent_id = a.agent_id, job_id = a.job.job_id, project = %a.job.project.path, error = %e, status = e.http_status(), "k8s-proxy: no response from the agent");
                return status_response(&e);
            }
        };
        tracing::info!(
            request_id = %ctx.request_id, agent_id = a.agent_id, job_id = a.job.job_id,
            project = %a.job.project.path, access_as = a.allowed.mode.as_str(),
            method = %head.method, path = %head.path_and_query, status = rhead.status,
            head_ms = ctx.started.elapsed().as_secs_f64() * 1000.0, "k8s-proxy: request"
        );
        let audit = self
            .opts
            .audit
            .clone()
            .map(|sink| (decided(u16::try_from(rhead.status).unwrap_or(0)), sink));
        respond(rhead, tbody, on_upgrade, audit, ctx)
    }
}

/// The client's response: the agent's head, then its body (audited as it streams), or
/// after a 101 the raw bytes both ways.
fn respond(
    rhead: ResponseHead,
    tbody: TunnelBody,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    audit: Option<(AuditRecord, Arc<dyn AuditSink>)>,
    ctx: Ctx,
) -> Response<ProxyBody> {
    let internal = || {
        status_response(&Error::internal(
            "kas could not process the request; see kas logs",
        ))
    };
    let Ok(status) = StatusCode::from_u16(u16::try_from(rhead.status).unwrap_or(0)) else {
        return internal();
    };
    let mut resp_headers = headers::from_wire(&rhead.headers, false);
    let mut resp = if status == StatusCode::SWITCHING_PROTOCOLS {
        resp_headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Some((mut record, sink)) = audit {
            record.duration_ms = ctx.started.elapsed().as_secs_f64() * 1000.0;
            sink.record(record);
        }
        let Some(on) = on_upgrade else {
            return internal();
        };
        tokio::spawn(splice(on, tbody, ctx.request_id));
        Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync())
    } else {
        let body = tbody.map_err(Into::into).boxed_unsync();
        match audit {
            Some((mut record, sink)) => {
                record.completed = false;
                Response::new(AuditedBody::new(body, record, sink, ctx.started).boxed_unsync())
            }
            None => Response::new(body),
        }
    };
    *resp.status_mut() = status;
    *resp.headers_mut() = resp_headers;
    resp
}

/// An audit record for `job`'s request, before the outcome is known (access_as
/// `none`, no identity: the caller fills in what was decided).
fn audit_record(
    job: &JobContext,
    agent_id: u64,
    ctx: &Ctx,
    method: &str,
    path_and_query: &str,
    code: u16,
) -> AuditRecord {
    AuditRecord {
        time: ctx.arrived,
        request_id: ctx.request_id.clone(),
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

/// Copies raw bytes both ways between an upgraded client connection and the tunnel.
async fn splice(on: hyper::upgrade::OnUpgrade, from_agent: TunnelBody, request_id: String) {
    let upgraded = match on.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(%request_id, error = %e, "k8s-proxy: client upgrade failed");
            return;
        }
    };
    let Some(out) = from_agent.outbound() else {
        return;
    };
    let mut incoming = Box::pin(
        from_agent
            .into_data_stream()
            .take_while(|r| std::future::ready(r.is_ok()))
            .filter_map(|r| std::future::ready(r.ok())),
    );
    kas_tunnel::splice(TokioIo::new(upgraded), &out, &mut incoming).await;
}

/// A new request id: a random number as 16 lower-case hex digits (what `{:016x}`
/// writes, without the formatting machinery: every proxied request makes one).
pub fn new_request_id() -> String {
    hex16(rand::random::<u64>())
}

fn hex16(v: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    (0..16u32)
        .rev()
        .map(|i| char::from(HEX[usize::try_from((v >> (i * 4)) & 0xf).unwrap_or(0)]))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_sixteen_hex_digits() {
        for v in [0, 1, 0xfeed, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(super::hex16(v), format!("{v:016x}"));
        }
    }
}
