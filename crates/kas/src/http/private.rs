//! The private kas-to-kas API on its own listener: the router's gateway service
//! (gRPC), behind a check that the caller is another kas replica.

use axum::response::IntoResponse;
use kas_router::{GatewayService, PrivateAuth};
use std::sync::Arc;

/// The gateway service behind the replicas' JWT check.
pub fn router(gateway: GatewayService, auth: Arc<PrivateAuth>) -> axum::Router {
    let gateway = kas_proto::v1::gateway_server::GatewayServer::new(gateway)
        .max_decoding_message_size(kas_proto::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(kas_proto::MAX_MESSAGE_SIZE);
    tonic::service::Routes::new(gateway)
        .into_axum_router()
        .layer(axum::middleware::from_fn(move |req, next| {
            only_replicas(auth.clone(), req, next)
        }))
}

/// Lets only other kas replicas (a valid private API JWT) through; 401 otherwise.
async fn only_replicas(
    auth: Arc<PrivateAuth>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.verify(header) {
        Ok(_) => next.run(req).await,
        Err(reason) => {
            tracing::warn!(%reason, "private API: refused a request without a valid token");
            (
                axum::http::StatusCode::UNAUTHORIZED,
                "unauthorized: this API is for kas replicas only\n",
            )
                .into_response()
        }
    }
}
