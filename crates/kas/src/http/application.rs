//! The application API on kas's API listener: how the central application reaches its
//! agents, their clusters' APIs and in-cluster services. Authenticated by an HS256 JWT
//! (audience `kas-application`, `exp` required) signed with a secret shared with the
//! application; anything else gets 401.
//!
//! - `GET  /application/v1/agents`: agents and their connection state.
//! - `ANY  /application/v1/agents/<id>/kubernetes/<path>`: the cluster API, as the agent,
//!   or as the user the application names with `Impersonate-User` (`-Uid`, `-Group`,
//!   `-Extra-*`): the application is trusted to say whom it acts for.
//! - `ANY  /application/v1/agents/<id>/services/<scheme>/<host>/<port>/<path>`: an
//!   in-cluster HTTP service, if the agent's `service_access` allows it.
//!
//! Bodies stream both ways. Every call is recorded in the Kubernetes integration log
//! (tracing target `k8s_integration`, and optionally a JSON-lines file), without secrets.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use kas_api::application::AgentState;
use kas_api::clock::unix_secs;
use kas_api::error::{Error, Failure};
use kas_controlplane::ControlPlane;
use kas_proto::v1::{ExtraValues, Impersonation, RequestHead, Service};
use kas_router::AgentRouter;
use kas_tunnel::headers;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use kas_api::application::AUDIENCE;

/// What the application API needs.
pub struct AppState {
    pub cp: Arc<dyn ControlPlane>,
    pub router: Arc<AgentRouter>,
    pub decoding: DecodingKey,
    /// Built once: HS256, audience `kas-application`, `exp` required.
    pub validation: Validation,
    pub agent_wait: Duration,
    pub log: IntegrationLog,
}

/// How application tokens are checked.
pub fn validation() -> Validation {
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&[AUDIENCE]);
    v.set_required_spec_claims(&["exp", "aud"]);
    // Allowed clock skew between the application and kas, for `exp` and `nbf`.
    v.leeway = 10;
    v.validate_nbf = true;
    v
}

/// The Kubernetes integration log: one structured record per cluster call.
#[derive(Clone)]
pub struct IntegrationLog {
    file: Option<kas_telemetry::batch::Batched>,
}

/// The log of a pod kas ran.
#[derive(Debug, Serialize)]
struct PodLog<'a> {
    time: u64,
    agent_id: u64,
    target: &'a str,
    pod: &'a str,
    log: &'a str,
}

/// One cluster call made for the application.
#[derive(Debug, Serialize)]
struct Record<'a> {
    time: u64,
    agent_id: u64,
    target: &'a str,
    method: &'a str,
    path: &'a str,
    status: u16,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<&'a str>,
    request_id: &'a str,
}

impl IntegrationLog {
    /// Logs to the `k8s_integration` tracing target and, with `file`, appends JSON
    /// lines to it (written by a background thread, so a slow disk never blocks a call).
    /// Keep the `Flush` until shutdown: dropping it writes the lines still queued.
    pub fn new(
        file: Option<std::path::PathBuf>,
    ) -> (IntegrationLog, Option<kas_telemetry::batch::Flush>) {
        match file {
            None => (IntegrationLog { file: None }, None),
            Some(path) => {
                let (out, flush) = crate::audit::line_writer(
                    &crate::audit::AuditTarget::File(path),
                    "Kubernetes integration log",
                );
                (IntegrationLog { file: Some(out) }, flush)
            }
        }
    }

    /// Copies the log of a pod kas ran (a managed application's install pod).
    pub fn pod_log(&self, agent_id: u64, pod: &str, log: &str) {
        tracing::info!(
            target: "k8s_integration",
            agent_id, pod, log, "pod log"
        );
        if let Some(out) = &self.file {
            let r = PodLog {
                time: unix_secs(),
                agent_id,
                target: "pod_log",
                pod,
                log,
            };
            if let Ok(mut line) = serde_json::to_string(&r) {
                line.push('\n');
                out.append(line.as_bytes());
            }
        }
    }

    fn record(&self, r: &Record<'_>) {
        tracing::info!(
            target: "k8s_integration",
            agent_id = r.agent_id, target_kind = r.target, method = r.method, path = r.path,
            status = r.status, duration_ms = r.duration_ms, error_code = r.error_code,
            request_id = r.request_id, "cluster call"
        );
        if let Some(out) = &self.file {
            if let Ok(mut line) = serde_json::to_string(r) {
                line.push('\n');
                out.append(line.as_bytes());
            }
        }
    }
}

/// The application API router (paths under `/application/v1`).
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/agents", get(list_agents))
        .route("/agents/:id/kubernetes", any(kubernetes))
        .route("/agents/:id/kubernetes/*path", any(kubernetes))
        .route("/agents/:id/services/:scheme/:host/:port", any(service))
        .route(
            "/agents/:id/services/:scheme/:host/:port/*path",
            any(service),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state);
    Router::new().nest(kas_api::application::PREFIX, api)
}

/// The control plane could not be read.
fn control_plane() -> Error {
    Error::failure(Failure::ControlPlane, "control plane unavailable")
}

/// `e` as the application API answers failures: `{"error", "code"}`.
fn failed(e: &Error) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.body(true))).into_response()
}

async fn auth(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(kas_api::bearer_token);
    match token.map(|t| {
        jsonwebtoken::decode::<serde_json::Value>(t.trim(), &state.decoding, &state.validation)
    }) {
        Some(Ok(_)) => next.run(req).await,
        Some(Err(e)) => {
            tracing::info!(reason = %e, "application API: invalid token");
            failed(&Error::unauthenticated("invalid application token"))
        }
        None => failed(&Error::unauthenticated("an application token is required")),
    }
}

async fn list_agents(State(s): State<Arc<AppState>>) -> Response {
    let agents = match s.cp.list_agents().await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "application API: control plane unavailable");
            return failed(&control_plane());
        }
    };
    let connected = s.router.connected_agents().await;
    let out: Vec<AgentState> = agents
        .into_iter()
        .map(|a| {
            let c = connected.iter().find(|c| c.agent_id == a.id);
            let reps = c.map(|c| c.replicas.as_slice()).unwrap_or_default();
            let mut kas: Vec<String> = reps.iter().filter_map(|r| r.kas.clone()).collect();
            kas.sort();
            kas.dedup();
            let mut versions: Vec<String> = reps.iter().map(|r| r.agent_version.clone()).collect();
            versions.sort();
            versions.dedup();
            AgentState {
                id: a.id,
                name: a.name,
                config_project: a.project_path,
                connected: !reps.is_empty(),
                replicas: reps.len(),
                kas,
                connected_since: reps.iter().map(|r| r.connected_since).min(),
                agent_versions: versions,
            }
        })
        .collect();
    Json(out).into_response()
}

/// Path and query after `prefix_segments` segments of the request path.
fn rest_of(req: &Request, prefix_segments: usize) -> String {
    let path = req.uri().path();
    let rest: Vec<&str> = path.split('/').skip(prefix_segments + 1).collect();
    let mut out = format!("/{}", rest.join("/"));
    if let Some(q) = req.uri().query() {
        out.push('?');
        out.push_str(q);
    }
    out
}

// Inside the nested router the URI path starts at `/agents/...` (axum strips the
// `/application/v1` prefix).
fn agent_id(req: &Request) -> Option<u64> {
    // /agents/<id>/...
    req.uri().path().split('/').nth(2)?.parse().ok()
}

/// The impersonation the application asks for with `Impersonate-*` headers.
fn impersonation(h: &HeaderMap) -> Result<Option<Impersonation>, String> {
    let text = |v: &http::HeaderValue| {
        v.to_str()
            .map(str::to_string)
            .map_err(|_| "impersonation headers must be text".to_string())
    };
    let Some(user) = h.get("impersonate-user") else {
        if h.keys().any(|k| k.as_str().starts_with("impersonate-")) {
            return Err("Impersonate-User is required with other Impersonate-* headers".into());
        }
        return Ok(None);
    };
    let mut i = Impersonation {
        username: text(user)?,
        ..Default::default()
    };
    if let Some(uid) = h.get("impersonate-uid") {
        i.uid = text(uid)?;
    }
    for g in h.get_all("impersonate-group") {
        i.groups.push(text(g)?);
    }
    for (name, value) in h {
        if let Some(key) = name.as_str().strip_prefix("impersonate-extra-") {
            let key = percent_encoding::percent_decode_str(key)
                .decode_utf8()
                .map_err(|_| "bad Impersonate-Extra key".to_string())?
                .to_string();
            match i.extra.iter_mut().find(|e| e.key == key) {
                Some(e) => e.values.push(text(value)?),
                None => i.extra.push(ExtraValues {
                    key,
                    values: vec![text(value)?],
                }),
            }
        }
    }
    if i.username.trim().is_empty() {
        return Err("Impersonate-User must not be empty".into());
    }
    Ok(Some(i))
}

async fn kubernetes(State(s): State<Arc<AppState>>, req: Request) -> Response {
    let Some(id) = agent_id(&req) else {
        return failed(&Error::not_found("no such agent"));
    };
    let path = rest_of(&req, 3);
    let imp = match impersonation(req.headers()) {
        Ok(i) => i,
        Err(m) => return failed(&Error::bad_request(m)),
    };
    forward(s, id, "kubernetes".to_string(), None, imp, path, req).await
}

async fn service(State(s): State<Arc<AppState>>, req: Request) -> Response {
    let Some(id) = agent_id(&req) else {
        return failed(&Error::not_found("no such agent"));
    };
    let segs: Vec<String> = req
        .uri()
        .path()
        .split('/')
        .skip(4)
        .take(3)
        .map(str::to_string)
        .collect();
    let (scheme, host, port) = match segs.as_slice() {
        [scheme, host, port] => (scheme.clone(), host.clone(), port.parse::<u32>().ok()),
        _ => return failed(&Error::not_found("no such service path")),
    };
    let Some(port) = port.filter(|p| *p > 0 && *p <= 65535) else {
        return failed(&Error::bad_request("the service port is not a port"));
    };
    if !matches!(scheme.as_str(), "http" | "https") {
        return failed(&Error::bad_request(
            "the service scheme must be http or https",
        ));
    }
    let path = rest_of(&req, 6);
    let target = format!("service:{scheme}://{host}:{port}");
    let svc = Service { scheme, host, port };
    forward(s, id, target, Some(svc), None, path, req).await
}

async fn forward(
    s: Arc<AppState>,
    agent_id: u64,
    target: String,
    service: Option<Service>,
    impersonation: Option<Impersonation>,
    path_and_query: String,
    req: Request,
) -> Response {
    let started = Instant::now();
    let request_id = kas_k8s_proxy::new_request_id();
    let method = req.method().as_str().to_string();
    let log_path = path_and_query
        .split('?')
        .next()
        .unwrap_or_default()
        .to_string();
    let record = |status: u16, code: Option<&str>| {
        s.log.record(&Record {
            time: unix_secs(),
            agent_id,
            target: &target,
            method: &method,
            path: &log_path,
            status,
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            error_code: code,
            request_id: &request_id,
        })
    };
    match s.cp.agent_info(agent_id).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            let e = Error::failure(
                Failure::UnknownAgent,
                format!("agent {agent_id} does not exist"),
            );
            record(e.http_status(), e.failure.map(Failure::as_str));
            return failed(&e);
        }
        Err(e) => {
            tracing::error!(error = %e, "application API: control plane unavailable");
            let e = control_plane();
            record(e.http_status(), e.failure.map(Failure::as_str));
            return failed(&e);
        }
    }
    let replayable = http_body::Body::is_end_stream(req.body());
    let head = RequestHead {
        method: method.clone(),
        path_and_query,
        headers: headers::to_wire(req.headers(), true, false),
        impersonation,
        upgrade: false,
        request_id: request_id.clone(),
        end_of_body: replayable,
        service,
    };
    let body = req.into_body();
    match s
        .router
        .dispatch(agent_id, &head, body, replayable, s.agent_wait)
        .await
    {
        Ok((rhead, tbody)) => {
            let status =
                StatusCode::from_u16(rhead.status as u16).unwrap_or(StatusCode::BAD_GATEWAY);
            record(status.as_u16(), None);
            let mut resp = Response::new(Body::new(tbody.map_err(axum::Error::new)));
            *resp.status_mut() = status;
            *resp.headers_mut() = headers::from_wire(&rhead.headers, false);
            resp
        }
        Err(e) => {
            let e = Error::from(e);
            record(e.http_status(), e.failure.map(Failure::as_str));
            failed(&e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(claims: serde_json::Value) -> bool {
        let key = b"application-secret-of-at-least-32-bytes!";
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(key),
        )
        .expect("sign");
        jsonwebtoken::decode::<serde_json::Value>(&t, &DecodingKey::from_secret(key), &validation())
            .is_ok()
    }

    #[test]
    fn tokens_are_refused_before_their_nbf_and_after_their_exp() {
        let (n, aud) = (unix_secs(), AUDIENCE);
        assert!(check(serde_json::json!({"aud": aud, "exp": n + 60})));
        assert!(check(
            serde_json::json!({"aud": aud, "exp": n + 60, "nbf": n - 5})
        ));
        assert!(
            check(serde_json::json!({"aud": aud, "exp": n + 60, "nbf": n + 5})),
            "skew"
        );
        assert!(!check(
            serde_json::json!({"aud": aud, "exp": n + 600, "nbf": n + 300})
        ));
        assert!(!check(serde_json::json!({"aud": aud, "exp": n - 60})));
        assert!(!check(serde_json::json!({"aud": "other", "exp": n + 60})));
        assert!(!check(serde_json::json!({"aud": aud})), "exp required");
    }
}
