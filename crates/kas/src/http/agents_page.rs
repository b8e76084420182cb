//! The agents page (`/ui/agents` on the API listener): every agent with its config
//! project, connected replicas, the kas they are connected to, when this kas last saw
//! it, its version, and pods per namespace in its cluster.
//!
//! Authenticated by the admin token: `Authorization: Bearer`, or once with
//! `?token=...`, which sets an HttpOnly cookie and redirects to the bare URL (so the
//! token does not stay in the address bar). The page never waits on a cluster: pod
//! counts come from a reactive cache that a background task fills and refreshes; until
//! then the page says "loading" and reloads itself every few seconds.

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use kas_api::clock::unix_secs;
use kas_cache::{CacheOptions, Cached, ReactiveCache};
use kas_controlplane::ControlPlane;
use kas_proto::v1::RequestHead;
use kas_router::AgentRouter;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;

const COOKIE: &str = "kas_admin";

type PodCounts = BTreeMap<String, usize>;

/// What the page needs.
pub struct PageState {
    pub cp: Arc<dyn ControlPlane>,
    pub router: Arc<AgentRouter>,
    pub admin_token_hash: [u8; 32],
    pods: ReactiveCache<u64, PodCounts, CountError>,
    /// agent id -> unix seconds this kas last saw it connected (anywhere).
    last_seen: Mutex<HashMap<u64, u64>>,
}

/// Why an agent's pods could not be counted: shown on the page as a code, never the
/// cluster's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum CountError {
    #[error("Kubernetes error: {0}")]
    Status(u16),
    #[error("Kubernetes error: Timeout")]
    Timeout,
    #[error("Kubernetes error: Transport")]
    Transport,
    #[error("Kubernetes error: Decode")]
    Decode,
}

/// Pods per namespace, listed through the agent as the agent itself.
async fn count_pods(router: Arc<AgentRouter>, agent_id: u64) -> Result<PodCounts, CountError> {
    let head = RequestHead {
        method: "GET".into(),
        path_and_query: "/api/v1/pods".into(),
        headers: vec![kas_proto::v1::Header {
            name: "accept".into(),
            value: Bytes::from_static(b"application/json"),
        }],
        impersonation: None,
        upgrade: false,
        request_id: kas_k8s_proxy::new_request_id(),
        end_of_body: true,
        service: None,
    };
    let (rhead, body) = router
        .dispatch(
            agent_id,
            &head,
            Empty::<Bytes>::new(),
            true,
            Duration::from_secs(2),
        )
        .await
        .map_err(|e| CountError::Status(kas_api::error::Error::from(e).http_status()))?;
    if rhead.status != 200 {
        return Err(CountError::Status(
            u16::try_from(rhead.status).unwrap_or(502),
        ));
    }
    let bytes = tokio::time::timeout(Duration::from_secs(20), body.collect())
        .await
        .map_err(|_| CountError::Timeout)?
        .map_err(|_| CountError::Transport)?
        .to_bytes();
    let list: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| CountError::Decode)?;
    let mut counts = PodCounts::new();
    for pod in list["items"].as_array().into_iter().flatten() {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
        *counts.entry(ns.to_string()).or_default() += 1;
    }
    Ok(counts)
}

impl PageState {
    pub fn new(
        cp: Arc<dyn ControlPlane>,
        router: Arc<AgentRouter>,
        admin_token_hash: [u8; 32],
    ) -> Self {
        let r = router.clone();
        let pods = ReactiveCache::new(
            CacheOptions {
                ttl: Duration::from_secs(15),
                max_stale: Duration::from_secs(120),
                idle: Duration::from_secs(300),
            },
            move |agent_id: u64| Box::pin(count_pods(r.clone(), agent_id)),
        );
        PageState {
            cp,
            router,
            admin_token_hash,
            pods,
            last_seen: Mutex::default(),
        }
    }

    fn token_ok(&self, token: &str) -> bool {
        bool::from(kas_controlplane::hash_token(token.trim()).ct_eq(&self.admin_token_hash))
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(kas_api::bearer_token);
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")));
        bearer.or(cookie).is_some_and(|t| self.token_ok(t))
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ago(then: u64, now: u64) -> String {
    let d = now.saturating_sub(then);
    match d {
        0..=59 => "just now".into(),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=86399 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86400),
    }
}

#[derive(serde::Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

/// `GET /ui/agents`.
pub async fn page(
    State(s): State<Arc<PageState>>,
    Query(q): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(t) = q.token.as_deref() {
        return sign_in(&s, t);
    }
    if !s.authorized(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Html("<p>Sign in: open <code>/ui/agents?token=&lt;admin token&gt;</code> (the token is in kas's data dir, <code>admin-token</code>).</p>"),
        )
            .into_response();
    }
    let agents = match s.cp.list_agents().await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "agents page: control plane unavailable");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "control plane unavailable\n",
            )
                .into_response();
        }
    };
    let connected = s.router.connected_agents().await;
    let apps = s.cp.list_apps(None).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "agents page: cannot read managed applications");
        Vec::new()
    });
    let now = unix_secs();
    let mut rows = String::new();
    let mut loading = false;
    for a in &agents {
        let c = connected.iter().find(|c| c.agent_id == a.id);
        let reps = c.map(|c| c.replicas.as_slice()).unwrap_or_default();
        let seen = {
            let mut ls = s.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            if !reps.is_empty() {
                ls.insert(a.id, now);
            }
            ls.get(&a.id).copied()
        };
        let pods = if reps.is_empty() {
            "<span class=muted>-</span>".to_string()
        } else {
            pods_cell(s.pods.get(&a.id), &mut loading)
        };
        let cells = Cells {
            pods,
            apps: apps_cell(apps.iter().filter(|p| p.agent_id == a.id)),
        };
        rows.push_str(&row(a, reps, seen, now, &cells));
    }
    if agents.is_empty() {
        rows.push_str("<tr><td colspan=10 class=muted>No agents yet: <code>kasctl agent create</code></td></tr>");
    }
    let refresh = if loading { 2 } else { 10 };
    Html(render(&rows, agents.len(), refresh)).into_response()
}

/// `?token=`: a valid admin token becomes a cookie, and the page reloads without it.
fn sign_in(s: &PageState, t: &str) -> Response {
    if !s.token_ok(t) {
        return (StatusCode::UNAUTHORIZED, "invalid admin token\n").into_response();
    }
    let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/ui", t.trim());
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, "/ui/agents".to_string()),
        ],
    )
        .into_response()
}

/// The pods-per-namespace cell from the cache; `loading` is set while it fills.
fn pods_cell(pods: Cached<BTreeMap<String, usize>, CountError>, loading: &mut bool) -> String {
    match pods {
        Cached::Ready { value, .. } if value.is_empty() => "no pods".into(),
        Cached::Ready { value, .. } => value
            .iter()
            .map(|(ns, n)| format!("<span class=ns>{}: {n}</span>", esc(ns)))
            .collect::<Vec<_>>()
            .join(" "),
        Cached::NotReady => {
            *loading = true;
            "<span class=muted>loading</span>".into()
        }
        Cached::Failed(e) => format!("<span class=err>{}</span>", esc(&e.to_string())),
    }
}

/// The managed applications cell: each application with its state.
fn apps_cell<'a>(apps: impl Iterator<Item = &'a kas_api::ClusterApp>) -> String {
    let cells: Vec<String> = apps
        .map(|a| {
            let class = match a.state {
                kas_api::AppState::Errored => "err",
                kas_api::AppState::Installed => "on",
                _ => "muted",
            };
            let detail = match (&a.error_code, &a.version) {
                (Some(code), _) => format!(" ({})", esc(code)),
                (None, Some(v)) => format!(" {}", esc(v)),
                (None, None) => String::new(),
            };
            format!(
                "<div class=app>{}: <span class={class}>{}</span>{detail}</div>",
                esc(&a.name),
                a.state.as_str()
            )
        })
        .collect();
    if cells.is_empty() {
        "<span class=muted>-</span>".into()
    } else {
        cells.concat()
    }
}

/// Cells of a row filled from caches and other records.
struct Cells {
    pods: String,
    apps: String,
}

/// Distinct values, sorted.
fn distinct<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = values.collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// One agent's row.
fn row(
    a: &kas_api::records::Agent,
    reps: &[kas_api::admin::ConnectedReplica],
    seen: Option<u64>,
    now: u64,
    cells: &Cells,
) -> String {
    let kas = distinct(reps.iter().filter_map(|r| r.kas.as_deref()));
    let versions = distinct(reps.iter().map(|r| r.agent_version.as_str()));
    let mut warnings: Vec<&str> = reps.iter().filter_map(|r| r.warning.as_deref()).collect();
    warnings.dedup();
    let clusters = distinct(
        reps.iter()
            .map(|r| r.meta.kubernetes_version.as_str())
            .filter(|v| !v.is_empty()),
    );
    let runs_on: String = reps
        .iter()
        .filter(|r| !r.meta.pod_name.is_empty())
        .map(|r| {
            let node = if r.meta.node_name.is_empty() {
                String::new()
            } else {
                format!(" on {}", esc(&r.meta.node_name))
            };
            format!(
                "<div>{}/{}{node}</div>",
                esc(&r.meta.pod_namespace),
                esc(&r.meta.pod_name)
            )
        })
        .collect();
    let (state, class) = if reps.is_empty() {
        ("disconnected", "off")
    } else {
        ("connected", "on")
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "<tr data-agent=\"{id}\"><td>{name}</td><td>{project}</td><td class={class}>{state}</td><td>{replicas}{runs_on}</td><td>{kas}</td><td>{seen}</td><td>{versions}{warning}</td><td>{cluster}</td><td class=pods>{pods}</td><td class=apps>{apps}</td></tr>",
        id = a.id,
        name = esc(&a.name),
        project = esc(&a.project_path),
        replicas = reps.len(),
        kas = match (reps.is_empty(), kas.is_empty()) {
            (true, _) => "-".to_string(),
            (false, true) => "this kas".to_string(),
            (false, false) => esc(&kas.join(", ")),
        },
        seen = seen.map(|t| ago(t, now)).unwrap_or_else(|| "never (by this kas)".into()),
        versions = esc(&versions.join(", ")),
        warning = warnings
            .iter()
            .map(|w| format!("<div class=err>{}</div>", esc(w)))
            .collect::<String>(),
        cluster = if clusters.is_empty() {
            "<span class=muted>-</span>".to_string()
        } else {
            esc(&clusters.join(", "))
        },
        pods = cells.pods,
        apps = cells.apps,
    );
    out
}

/// The whole page around the rows.
fn render(rows: &str, n: usize, refresh: u32) -> String {
    format!(
        r#"<!doctype html>
<html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content="{refresh}">
<title>kas agents</title>
<style>
body{{font:14px system-ui,sans-serif;margin:2rem;color:#1f2328}}
h1{{font-size:1.3rem}} table{{border-collapse:collapse;width:100%}}
th,td{{text-align:left;padding:.45rem .7rem;border-bottom:1px solid #d0d7de;vertical-align:top}}
th{{background:#f6f8fa}} .on{{color:#1a7f37;font-weight:600}} .off{{color:#cf222e;font-weight:600}}
.muted{{color:#6e7781}} .err{{color:#cf222e}} .ns{{display:inline-block;background:#ddf4ff;border-radius:4px;padding:0 .35rem;margin:0 .2rem .2rem 0}}
</style></head><body>
<h1>Agents</h1>
<table><thead><tr><th>Agent</th><th>Config project</th><th>State</th><th>Replicas</th><th>kas</th><th>Last seen</th><th>Version</th><th>Kubernetes</th><th>Pods per namespace</th><th>Applications</th></tr></thead>
<tbody>{rows}</tbody></table>
<p class=muted>{n} agents. Pod counts are cached and refreshed in the background; this page never waits on a cluster.</p>
</body></html>"#,
    )
}
