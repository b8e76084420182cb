//! Kubernetes `Status` responses: what kubectl and client libraries expect on errors.

use crate::ProxyBody;
use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kas_api::error::Error;

/// `e` as a `Status` object response (its message is safe to show the client).
pub fn status_response(e: &Error) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(e.status_object().to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() =
        StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}
