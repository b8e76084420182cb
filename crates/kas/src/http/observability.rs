//! The observability listener: `/healthz` (alive), `/readyz` (the control plane and,
//! with several replicas, the shared registry usable) and `/metrics`.

use crate::metrics::Metrics;
use axum::http::StatusCode;
use axum::routing::get;
use kas_controlplane::ControlPlane;
use kas_router::AgentRouter;
use std::sync::Arc;

pub fn router(
    cp: Arc<dyn ControlPlane>,
    router: Arc<AgentRouter>,
    metrics: Arc<Metrics>,
) -> axum::Router {
    let r = router.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let (m, r) = (metrics.clone(), r.clone());
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(&r),
                    )
                }
            }),
        )
        .route("/readyz", get(move || ready(cp.clone(), router.clone())))
}

async fn ready(cp: Arc<dyn ControlPlane>, router: Arc<AgentRouter>) -> (StatusCode, &'static str) {
    if !router.ready().await {
        tracing::warn!("not ready: shared agent registry (Redis) unusable");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shared agent registry unavailable\n",
        );
    }
    match cp.list_groups().await {
        Ok(_) => (StatusCode::OK, "ready\n"),
        Err(e) => {
            tracing::warn!(error = %e, "not ready: control plane unusable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "control plane unavailable\n",
            )
        }
    }
}
