//! Serving one request that arrived through a tunnel against the cluster API (or an
//! in-cluster service): [`Upstream`] is agentk's [`Handler`] of tunnel exchanges.

use crate::cluster::{
    empty_body, ClusterAccess, ClusterClient, ClusterConnector, KeptConnection, UpstreamBody,
};
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderName, HeaderValue, Request, Uri};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::TokioIo;
use kas_proto::v1::ServiceAccess;
use kas_proto::v1::{tunnel_error::Code, Impersonation, RequestHead, ResponseHead};
use kas_tunnel::agent::{service_allowed, AgentOut, Handler};
use kas_tunnel::{headers, pump_body, splice};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::sync::mpsc;

/// What the agent needs to serve requests.
pub struct Upstream {
    pub access: ClusterAccess,
    /// The cluster API, with the agent's credentials.
    cluster: ClusterConnector,
    /// In-cluster services, without credentials.
    pub service_client: ClusterClient,
    /// The services the configuration allows (replaced on every configuration).
    services: std::sync::RwLock<std::sync::Arc<Vec<ServiceAccess>>>,
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
            cluster: access.connector()?,
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
        let uri = target_path(self.access.server(), "/version").map_err(|(_, m)| m)?;
        let req = Request::get(uri)
            .body(empty_body())
            .map_err(|e| e.to_string())?;
        let resp = self
            .cluster
            .request(&mut KeptConnection::default(), req)
            .await
            .map_err(|e| e.to_string())?;
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

    /// Applies a configuration from kas (parsed and validated there): the services the
    /// application may reach and the log levels.
    pub fn configure(&self, c: &kas_proto::v1::AgentConfiguration) {
        self.apply_log_levels(&c.log_level, &c.grpc_log_level);
        let services = c.service_access.clone();
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

    fn allowed_services(&self) -> std::sync::Arc<Vec<ServiceAccess>> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

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

/// The URI of an in-cluster service request, if `service_access` allows it.
fn service_uri(
    allowed: &[ServiceAccess],
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

/// The origin-form URI (path and query) of a request for `path_and_query` on the API
/// server at `base`, under the server URL's own path if it has one.
fn target_path(base: &Uri, path_and_query: &str) -> Result<Uri, (Code, String)> {
    let bad = |m: &str| (Code::BadRequest, m.to_string());
    if !path_and_query.starts_with('/') {
        return Err(bad("request path must start with '/'"));
    }
    let prefix = base.path().trim_end_matches('/');
    let joined = if prefix.is_empty() {
        path_and_query.parse()
    } else {
        format!("{prefix}{path_and_query}").parse()
    };
    joined.map_err(|_| bad("request path is invalid"))
}

/// Largest response body sent inline in the response head.
const INLINE_MAX: u64 = 64 * 1024;

impl Handler for Upstream {
    type Tunnel = KeptConnection;

    /// Performs the request against the cluster (on the tunnel's connection) or a
    /// service, and streams the response to `out`.
    async fn respond(
        &self,
        kept: &mut KeptConnection,
        head: RequestHead,
        body_rx: Option<mpsc::Receiver<Bytes>>,
        out: &AgentOut,
    ) -> bool {
        let request_id = head.request_id.clone();
        let to_service = head.service.is_some();
        let (req, body_rx) = match self.request(head, body_rx) {
            Ok(r) => r,
            Err((code, m)) => {
                tracing::info!(%request_id, reason = %m, "refused a request");
                out.fail(code, &m).await;
                return false;
            }
        };
        let sent = if to_service {
            self.service_client.request(req).await
        } else {
            self.cluster.request(kept, req).await
        };
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                // The cause stays in the agent's log; kas and the caller learn only this.
                tracing::warn!(%request_id, error = %e, service = to_service, "upstream unreachable");
                let m = if to_service {
                    "the agent cannot reach the service"
                } else {
                    "the agent cannot reach the Kubernetes API server"
                };
                out.fail(Code::UpstreamUnavailable, m).await;
                return false;
            }
        };
        if let Some(client_bytes) =
            body_rx.filter(|_| resp.status() == http::StatusCode::SWITCHING_PROTOCOLS)
        {
            relay_upgrade(resp, client_bytes, out, &request_id).await;
            // An upgraded stream is never reused.
            return false;
        }
        let reusable = relay_response(resp, out, &request_id).await;
        if !to_service {
            kept.exchange_ended();
        }
        reusable
    }
}

impl Upstream {
    /// The upstream request for `head`: URL, method, headers with the agent's own
    /// credentials and the impersonation kas decided (neither for services), and the
    /// request body from `body_rx` (kept back and returned, for the client's bytes, on
    /// an upgrade).
    #[allow(clippy::type_complexity)]
    fn request(
        &self,
        head: RequestHead,
        body_rx: Option<mpsc::Receiver<Bytes>>,
    ) -> Result<(Request<UpstreamBody>, Option<mpsc::Receiver<Bytes>>), (Code, String)> {
        let uri = match &head.service {
            None => target_path(self.access.server(), &head.path_and_query)?,
            Some(svc) => service_uri(&self.allowed_services(), svc, &head.path_and_query)?,
        };
        let to_service = head.service.is_some();
        let method = http::Method::from_bytes(head.method.as_bytes())
            .map_err(|_| (Code::BadRequest, "invalid method".to_string()))?;
        let mut req_headers = headers::from_wire(&head.headers, true);
        // Services never see the agent's credentials (their client has none) or an
        // impersonation.
        if let Some(i) = head.impersonation.as_ref().filter(|_| !to_service) {
            for (n, v) in impersonation_headers(i).map_err(|m| (Code::BadRequest, m))? {
                req_headers.append(n, v);
            }
        }
        let (body, kept): (UpstreamBody, _) = match body_rx {
            Some(rx) if head.upgrade => (empty_body(), Some(rx)),
            Some(rx) => {
                let frames = tokio_stream::wrappers::ReceiverStream::new(rx)
                    .map(|b| Ok::<_, std::io::Error>(Frame::data(b)));
                let body = StreamBody::new(frames)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                    .boxed_unsync();
                (body, None)
            }
            // The head was the whole request: the cluster gets no body, and the HTTP
            // client knows it has none.
            None => (empty_body(), None),
        };
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = req_headers;
        Ok((req, kept))
    }
}

/// Streams a response to kas: a small body of known length inside the head (one
/// message instead of three), a larger one as Data frames. True when all of it went.
async fn relay_response(
    resp: http::Response<hyper::body::Incoming>,
    out: &AgentOut,
    request_id: &str,
) -> bool {
    let mut rhead = ResponseHead {
        status: u32::from(resp.status().as_u16()),
        headers: headers::to_wire(resp.headers(), false, false),
        body: Bytes::new(),
        end_of_body: false,
    };
    let small = http_body::Body::size_hint(resp.body())
        .exact()
        .is_some_and(|n| n <= INLINE_MAX);
    if !small {
        return out.head(rhead).await && pump_body(resp.into_body(), out).await.is_ok();
    }
    match resp.into_body().collect().await {
        Ok(b) => {
            rhead.body = b.to_bytes();
            rhead.end_of_body = true;
            out.head(rhead).await
        }
        Err(e) => {
            tracing::warn!(%request_id, error = %e, "cluster response body failed");
            out.fail(
                Code::UpstreamUnavailable,
                "the cluster's response was cut off",
            )
            .await;
            false
        }
    }
}

/// After a 101: the client's bytes to the upgraded upstream connection and back.
async fn relay_upgrade(
    mut resp: http::Response<hyper::body::Incoming>,
    body_rx: mpsc::Receiver<Bytes>,
    out: &AgentOut,
    request_id: &str,
) {
    let rhead = ResponseHead {
        status: u32::from(resp.status().as_u16()),
        headers: headers::to_wire(resp.headers(), false, true),
        body: Bytes::new(),
        end_of_body: false,
    };
    if !out.head(rhead).await {
        return;
    }
    let upgraded = match hyper::upgrade::on(&mut resp).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(%request_id, error = %e, "cluster upgrade failed");
            out.fail(
                Code::UpstreamAborted,
                "the upgraded connection to the cluster failed",
            )
            .await;
            return;
        }
    };
    let mut from_kas = tokio_stream::wrappers::ReceiverStream::new(body_rx);
    splice(TokioIo::new(upgraded), out, &mut from_kas).await;
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
    fn target_paths() {
        let base: Uri = "https://k:6443/prefix/".parse().expect("uri");
        assert_eq!(
            target_path(&base, "/api/v1?x=1").expect("ok").to_string(),
            "/prefix/api/v1?x=1"
        );
        assert!(target_path(&base, "api").is_err());
        let bare: Uri = "https://k:6443".parse().expect("uri");
        assert_eq!(
            target_path(&bare, "/api/v1/pods?watch=1")
                .expect("ok")
                .to_string(),
            "/api/v1/pods?watch=1"
        );
    }
}
