//! Admin endpoints of EKS clusters created from kas (see `crate::cluster::eks`).

use super::{AdminState, ApiError, ApiResult, Audited};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use kas_api::admin::{EksCreate, EksName, EksPrepare, EksPrepared};
use kas_api::error::Error;
use kas_api::records::EksCluster;
use std::sync::Arc;

type Accepted<T> = Result<(StatusCode, Extension<Audited>, Json<T>), ApiError>;

fn eks(s: &AdminState) -> Result<&Arc<crate::cluster::eks::Eks>, ApiError> {
    s.eks.as_ref().ok_or_else(|| {
        ApiError(Error::not_found(
            "EKS clusters are off on this kas (start it with --eks to turn them on)",
        ))
    })
}

fn audited(action: &'static str, c: &EksCluster) -> Audited {
    Audited::new(action, format!("EKS cluster {}", c.name))
        .detail("state", c.state.as_str())
        .detail("project", &c.project_path)
}

pub(super) async fn prepare(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<EksPrepare>,
) -> Accepted<EksPrepared> {
    let p = eks(&s)?
        .prepare(&r.name, &r.project)
        .await
        .map_err(ApiError)?;
    let a = audited("eks.prepare", &p.cluster);
    Ok((StatusCode::CREATED, Extension(a), Json(p)))
}

pub(super) async fn create(
    State(s): State<Arc<AdminState>>,
    Json(r): Json<EksCreate>,
) -> Accepted<EksCluster> {
    let w = eks(&s)?.create(&r.name, r.spec).await.map_err(ApiError)?;
    let a = audited("eks.create", &w.cluster);
    Ok((StatusCode::ACCEPTED, Extension(a), Json(w.cluster)))
}

pub(super) async fn delete(
    State(s): State<Arc<AdminState>>,
    Query(q): Query<EksName>,
) -> Accepted<EksCluster> {
    let w = eks(&s)?.delete(&q.name).await.map_err(ApiError)?;
    let a = audited("eks.delete", &w.cluster);
    Ok((StatusCode::ACCEPTED, Extension(a), Json(w.cluster)))
}

#[derive(serde::Deserialize)]
pub(super) struct ShowQuery {
    name: Option<String>,
}

/// One cluster with `?name=`, else all.
pub(super) async fn show(
    State(s): State<Arc<AdminState>>,
    Query(q): Query<ShowQuery>,
) -> ApiResult<Vec<EksCluster>> {
    Ok(Json(match q.name {
        Some(n) => vec![s.cp.get_eks(&n).await?],
        None => s.cp.list_eks().await?,
    }))
}
