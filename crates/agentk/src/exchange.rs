//! Serving one request that arrived through a tunnel against the cluster API.

use crate::cluster::{ClusterAccess, UpstreamBody};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioIo;
use kas_authz::services::{service_allowed, AllowedService};
use kas_proto::v1::{
    agent_frame, server_frame, tunnel_error::Code, AgentFrame, Data, EndOfBody, Impersonation,
    RequestHead, ResponseHead, ServerFrame, TunnelError,
};
use kas_proto::MAX_DATA_FRAME;
use kas_tunnel::headers;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::Streaming;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, UpstreamBody>;

/// What the agent needs to serve requests.
pub struct Upstream {
    pub access: ClusterAccess,
    /// The cluster API, with the agent's credentials.
    pub client: HttpsClient,
    /// In-cluster services, without credentials.
    pub service_client: HttpsClient,
    /// The services the configuration allows (replaced on every configuration).
    services: std::sync::RwLock<std::sync::Arc<Vec<AllowedService>>>,
    /// What the observability endpoint reports.
    pub stats: std::sync::Arc<crate::stats::Stats>,
    /// Where this replica runs (pod, namespace, node; the cluster's version once read).
    meta: std::sync::Mutex<kas_proto::v1::AgentMeta>,
    /// Applies `observability.logging` from the configuration, when logging is set up.
    log_level: Option<kas_telemetry::LogLevel>,
    /// Whether the configuration changed the log filter (so a configuration without
    /// levels goes back to the one agentk started with).
    log_level_set: std::sync::atomic::AtomicBool,
}

impl Upstream {
    pub fn new(access: ClusterAccess) -> Result<Self, crate::cluster::ClusterConfigError> {
        Ok(Upstream {
            client: access.client()?,
            service_client: access.service_client()?,
            access,
            services: Default::default(),
            stats: Default::default(),
            meta: Default::default(),
            log_level: None,
            log_level_set: Default::default(),
        })
    }

    /// Where this replica runs, as reported to kas.
    pub fn with_meta(self, meta: kas_proto::v1::AgentMeta) -> Self {
        *self.meta.lock().unwrap_or_else(|p| p.into_inner()) = meta;
        self
    }

    /// Lets the configuration's `observability.logging` change the log filter.
    pub fn with_log_level(mut self, l: kas_telemetry::LogLevel) -> Self {
        self.log_level = Some(l);
        self
    }

    /// The replica's meta, with the cluster's Kubernetes version (read from `/version`
    /// once, within `wait`; left empty while the cluster does not answer).
    pub async fn meta(&self, wait: std::time::Duration) -> kas_proto::v1::AgentMeta {
        let known = self.meta.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !known.kubernetes_version.is_empty() {
            return known;
        }
        match tokio::time::timeout(wait, self.cluster_version()).await {
            Ok(Ok(v)) => {
                let mut m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
                m.kubernetes_version = v;
                m.clone()
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the cluster's version");
                known
            }
            Err(_) => known,
        }
    }

    async fn cluster_version(&self) -> Result<String, String> {
        let uri = target_uri(&self.access.server, "/version").map_err(|(_, m)| m)?;
        let mut req = Request::get(uri);
        if let Some(a) = self.access.auth.header() {
            req = req.header(http::header::AUTHORIZATION, a);
        }
        let req = req
            .body(
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("GET /version: {}", resp.status()));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        v["gitVersion"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "GET /version: no gitVersion".to_string())
    }

    /// Applies a configuration from kas (already validated there): the services the
    /// application may reach and the log levels.
    pub fn configure(&self, c: &kas_proto::v1::AgentConfiguration) {
        self.apply_log_levels(&c.log_level, &c.grpc_log_level);
        let (yaml, config_project) = (&c.config_yaml, &c.config_project_path);
        let services = match kas_authz::parse_agent_config_with(yaml, config_project, None) {
            Ok((c, _)) => c.allowed_services(),
            Err(e) => {
                // kas validated it; a newer kas may know fields this agent does not.
                tracing::warn!(error = %e, "cannot read service_access from the configuration; no services allowed");
                Vec::new()
            }
        };
        *self.services.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(services);
    }

    /// `observability.logging.level` for agentk itself and `grpc_level` (GitLab's
    /// default: error) for the gRPC, HTTP/2 and TLS libraries; neither set: the filter
    /// agentk started with.
    fn apply_log_levels(&self, level: &str, grpc_level: &str) {
        use std::sync::atomic::Ordering;
        let Some(handle) = &self.log_level else {
            return;
        };
        let result = if level.is_empty() && grpc_level.is_empty() {
            if !self.log_level_set.swap(false, Ordering::Relaxed) {
                return;
            }
            handle.reset()
        } else {
            self.log_level_set.store(true, Ordering::Relaxed);
            let own = if level.is_empty() { "info" } else { level };
            let grpc = if grpc_level.is_empty() {
                "error"
            } else {
                grpc_level
            };
            let filter = format!(
                "{own},h2={grpc},tonic={grpc},hyper={grpc},hyper_util={grpc},tower={grpc},rustls={grpc}"
            );
            handle.set(&filter)
        };
        match result {
            Ok(()) => tracing::info!(
                level,
                grpc_level,
                "log levels from the configuration applied"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot apply the configuration's log levels"),
        }
    }

    fn allowed_services(&self) -> std::sync::Arc<Vec<AllowedService>> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub type Out = mpsc::Sender<AgentFrame>;

/// Characters kept as they are in `Impersonate-Extra-<key>` names: RFC 9110 token
/// characters except `%` (which escapes).
const EXTRA_KEY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'*')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// Impersonation headers as Kubernetes expects them (extra keys percent-encoded).
pub fn impersonation_headers(i: &Impersonation) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let v = |s: &str| {
        HeaderValue::from_str(s)
            .map_err(|_| format!("impersonation value `{s}` is not a valid header value"))
    };
    let mut out = vec![(HeaderName::from_static("impersonate-user"), v(&i.username)?)];
    if !i.uid.is_empty() {
        out.push((HeaderName::from_static("impersonate-uid"), v(&i.uid)?));
    }
    for g in &i.groups {
        out.push((HeaderName::from_static("impersonate-group"), v(g)?));
    }
    for e in &i.extra {
        let name = format!(
            "impersonate-extra-{}",
            utf8_percent_encode(&e.key, EXTRA_KEY)
        );
        let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("impersonation extra key `{}` cannot be sent", e.key))?;
        for val in &e.values {
            out.push((name.clone(), v(val)?));
        }
    }
    Ok(out)
}

async fn send(out: &Out, msg: agent_frame::Msg) -> bool {
    out.send(AgentFrame { msg: Some(msg) }).await.is_ok()
}

async fn fail(out: &Out, code: Code, message: &str) {
    let _ = send(
        out,
        agent_frame::Msg::Error(TunnelError {
            code: code as i32,
            message: message.to_string(),
        }),
    )
    .await;
}

/// The URI of an in-cluster service request, if `service_access` allows it.
fn service_uri(
    allowed: &[AllowedService],
    svc: &kas_proto::v1::Service,
    path_and_query: &str,
) -> Result<Uri, (Code, String)> {
    let bad = |m: &str| (Code::BadRequest, m.to_string());
    if !path_and_query.starts_with('/') {
        return Err(bad("request path must start with '/'"));
    }
    let port = u16::try_from(svc.port).map_err(|_| bad("invalid service port"))?;
    let path = path_and_query.split('?').next().unwrap_or("/");
    if !service_allowed(allowed, &svc.scheme, &svc.host, port, path) {
        return Err((
            Code::Forbidden,
            format!(
                "{}://{}:{port}{path} is not allowed by this agent's service_access",
                svc.scheme, svc.host
            ),
        ));
    }
    format!("{}://{}:{port}{path_and_query}", svc.scheme, svc.host)
        .parse()
        .map_err(|_| bad("invalid service URL"))
}

fn target_uri(base: &Uri, path_and_query: &str) -> Result<Uri, (Code, String)> {
    let bad = |m: &str| (Code::BadRequest, m.to_string());
    if !path_and_query.starts_with('/') {
        return Err(bad("request path must start with '/'"));
    }
    let prefix = base.path().trim_end_matches('/');
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(
        format!("{prefix}{path_and_query}")
            .parse()
            .map_err(|_| bad("request path is invalid"))?,
    );
    Uri::from_parts(parts).map_err(|_| bad("request path is invalid"))
}

/// Largest response body sent inline in the response head.
const INLINE_MAX: u64 = 64 * 1024;

/// Reserves room for one chunk in the request-body channel (owned, so the channel
/// can be replaced while a reservation is pending).
async fn reserve(tx: Option<mpsc::Sender<Bytes>>) -> Option<mpsc::OwnedPermit<Bytes>> {
    tx?.reserve_owned().await.ok()
}

/// Serves one exchange whose `head` has arrived on `inbound`; responses go to `out`.
/// Returns true when the exchange completed cleanly in both directions, so the tunnel
/// can carry another one; false when it was cancelled, failed or upgraded.
pub async fn serve(
    up: &Upstream,
    head: RequestHead,
    inbound: &mut Streaming<ServerFrame>,
    out: &Out,
) -> bool {
    let request_id = head.request_id.clone();
    tracing::debug!(%request_id, method = %head.method, path = %head.path_and_query, upgrade = head.upgrade, "serving a request");
    // Request body (or, after a 101, client bytes) from kas; closed at EndOfBody.
    let (tx, body_rx) = mpsc::channel::<Bytes>(4);
    // A head marked end_of_body is the whole request: no body frames follow.
    let mut request_done = head.end_of_body && !head.upgrade;
    let mut body_tx = (!request_done).then_some(tx);
    let mut pending: Option<Bytes> = None;
    let work = respond(up, head, body_rx, out);
    tokio::pin!(work);
    // One task reads kas's frames and drives the response, so the tunnel's stream can
    // be reused afterwards. A chunk waits in `pending` until the body channel has room:
    // that wait is the backpressure towards kas.
    loop {
        tokio::select! {
            biased;
            reusable = &mut work => return reusable && request_done,
            permit = reserve(body_tx.clone()), if pending.is_some() => match (permit, pending.take()) {
                (Some(p), Some(chunk)) => {
                    p.send(chunk);
                }
                // The upstream stopped reading the body; drop the rest of it.
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
                    // the protocol: cancel the cluster request.
                    tracing::debug!(%request_id, "kas cancelled the request");
                    return false;
                }
            },
        }
    }
}

/// Performs the cluster request and streams the response to `out`. Returns true when a
/// complete, non-upgraded response was sent.
async fn respond(
    up: &Upstream,
    head: RequestHead,
    mut body_rx: mpsc::Receiver<Bytes>,
    out: &Out,
) -> bool {
    let request_id = head.request_id.as_str();
    let target = match &head.service {
        None => target_uri(&up.access.server, &head.path_and_query),
        Some(svc) => service_uri(&up.allowed_services(), svc, &head.path_and_query),
    };
    let uri = match target {
        Ok(u) => u,
        Err((code, m)) => {
            tracing::info!(%request_id, reason = %m, "refused a request");
            fail(out, code, &m).await;
            return false;
        }
    };
    let to_service = head.service.is_some();
    let Ok(method) = http::Method::from_bytes(head.method.as_bytes()) else {
        fail(out, Code::BadRequest, "invalid method").await;
        return false;
    };
    let mut req_headers = headers::from_wire(&head.headers, true);
    // Services never see the agent's credentials or an impersonation.
    if let Some(a) = up.access.auth.header().filter(|_| !to_service) {
        req_headers.insert(http::header::AUTHORIZATION, a);
    }
    if let Some(i) = head.impersonation.as_ref().filter(|_| !to_service) {
        match impersonation_headers(i) {
            Ok(h) => {
                for (n, v) in h {
                    req_headers.append(n, v);
                }
            }
            Err(m) => {
                fail(out, Code::BadRequest, &m).await;
                return false;
            }
        }
    }
    let body: UpstreamBody = if head.upgrade {
        Empty::new().map_err(|never| match never {}).boxed_unsync()
    } else {
        let rx = std::mem::replace(&mut body_rx, mpsc::channel(1).1);
        let frames = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, std::io::Error>(Frame::data(b)));
        StreamBody::new(frames)
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            .boxed_unsync()
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = req_headers;
    let client = if to_service {
        &up.service_client
    } else {
        &up.client
    };
    let mut resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => {
            // The cause stays in the agent's log; kas and the caller learn only this.
            tracing::warn!(%request_id, error = %e, service = to_service, "upstream unreachable");
            let m = if to_service {
                "the agent cannot reach the service"
            } else {
                "the agent cannot reach the Kubernetes API server"
            };
            fail(out, Code::UpstreamUnavailable, m).await;
            return false;
        }
    };
    let status = resp.status();
    let switching = status == http::StatusCode::SWITCHING_PROTOCOLS && head.upgrade;
    let mut rhead = ResponseHead {
        status: u32::from(status.as_u16()),
        headers: headers::to_wire(resp.headers(), false, switching),
        body: Bytes::new(),
        end_of_body: false,
    };
    // A small body of known length travels inside the head: one message instead of three.
    let small = http_body::Body::size_hint(resp.body())
        .exact()
        .is_some_and(|n| n <= INLINE_MAX);
    if !switching && small {
        return match resp.into_body().collect().await {
            Ok(b) => {
                rhead.body = b.to_bytes();
                rhead.end_of_body = true;
                send(out, agent_frame::Msg::ResponseHead(rhead)).await
            }
            Err(e) => {
                tracing::warn!(%request_id, error = %e, "cluster response body failed");
                fail(
                    out,
                    Code::UpstreamUnavailable,
                    "the cluster's response was cut off",
                )
                .await;
                false
            }
        };
    }
    if !send(out, agent_frame::Msg::ResponseHead(rhead)).await {
        return false;
    }
    if switching {
        let upgraded = match hyper::upgrade::on(&mut resp).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(%request_id, error = %e, "cluster upgrade failed");
                fail(
                    out,
                    Code::UpstreamAborted,
                    "the upgraded connection to the cluster failed",
                )
                .await;
                return false;
            }
        };
        let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
        let to_cluster = async {
            while let Some(b) = body_rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        };
        let from_cluster = async {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = send(out, agent_frame::Msg::EndOfBody(EndOfBody {})).await;
                        return;
                    }
                    Ok(n) => {
                        let d = Data {
                            data: Bytes::copy_from_slice(&buf[..n]),
                        };
                        if !send(out, agent_frame::Msg::Data(d)).await {
                            return;
                        }
                    }
                }
            }
        };
        tokio::join!(to_cluster, from_cluster);
        // An upgraded stream is never reused.
        return false;
    }
    let mut body = resp.into_body().into_data_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(mut data) => {
                while !data.is_empty() {
                    let d = data.split_to(data.len().min(MAX_DATA_FRAME));
                    if !send(out, agent_frame::Msg::Data(Data { data: d })).await {
                        return false;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%request_id, error = %e, "cluster response body failed");
                fail(
                    out,
                    Code::UpstreamAborted,
                    "the cluster's response was cut off",
                )
                .await;
                return false;
            }
        }
    }
    send(out, agent_frame::Msg::EndOfBody(EndOfBody {})).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use kas_proto::v1::ExtraValues;

    #[test]
    fn extra_keys_are_percent_encoded() {
        let h = impersonation_headers(&Impersonation {
            username: "gitlab:ci_job:1".into(),
            uid: String::new(),
            groups: vec!["a".into(), "b".into()],
            extra: vec![ExtraValues {
                key: "agent.gitlab.com/id".into(),
                values: vec!["7".into()],
            }],
        })
        .expect("headers");
        let names: Vec<String> = h.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(
            names,
            [
                "impersonate-user",
                "impersonate-group",
                "impersonate-group",
                "impersonate-extra-agent.gitlab.com%2fid"
            ]
        );
    }

    #[test]
    fn target_uris() {
        let base: Uri = "https://k:6443/prefix/".parse().expect("uri");
        assert_eq!(
            target_uri(&base, "/api/v1?x=1").expect("ok").to_string(),
            "https://k:6443/prefix/api/v1?x=1"
        );
        assert!(target_uri(&base, "api").is_err());
    }
}
