//! Errors as kas reports them, classified by origin: one type ([`Error`]) that every
//! surface renders its own way, so a failure means the same thing everywhere:
//!
//! | surface | rendering |
//! | --- | --- |
//! | Kubernetes API proxy | a Kubernetes `Status` object ([`Error::status_object`]) |
//! | admin and application APIs | `{"error", "code"}` ([`Error::body`]) |
//! | agent and private gRPC APIs | a gRPC status code ([`Error::grpc_code`]) |
//!
//! The HTTP status comes from the [`Kind`]; the [`Origin`] says whose fault it is (for
//! logs and the table in docs/internals.md); a [`Failure`] code names why a request
//! got no answer from an agent, as the metrics count it. Messages are safe to show:
//! never an upstream body, never an internal detail (those go to kas's log only).

use crate::ErrorBody;
use serde_json::{json, Value};

/// Whose fault an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The caller: bad or missing credentials, a malformed request.
    Client,
    /// Authorization: the caller is known but not allowed.
    Policy,
    /// The agent: not connected, busy, or it refused.
    Agent,
    /// The cluster or service behind the agent, or the tunnel to it.
    Cluster,
    /// kas itself or what it depends on (control plane, registry).
    Internal,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Client => "client",
            Origin::Policy => "policy",
            Origin::Agent => "agent",
            Origin::Cluster => "cluster",
            Origin::Internal => "internal",
        }
    }
}

/// What kind of failure, which decides the status on every surface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BadRequest,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    TooManyRequests,
    /// A dependency is down or the agent is not there: retry later.
    Unavailable,
    /// The agent or cluster answered badly or not at all.
    BadGateway,
    Internal,
}

/// gRPC status codes (the numbers are gRPC's).
pub mod grpc {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const ALREADY_EXISTS: i32 = 6;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

impl Kind {
    /// The HTTP status.
    pub fn http_status(self) -> u16 {
        match self {
            Kind::BadRequest => 400,
            Kind::Unauthenticated => 401,
            Kind::Forbidden => 403,
            Kind::NotFound => 404,
            Kind::Conflict => 409,
            Kind::TooManyRequests => 429,
            Kind::Internal => 500,
            Kind::BadGateway => 502,
            Kind::Unavailable => 503,
        }
    }

    /// The `reason` of a Kubernetes `Status`.
    pub fn status_reason(self) -> &'static str {
        match self {
            Kind::BadRequest => "BadRequest",
            Kind::Unauthenticated => "Unauthorized",
            Kind::Forbidden => "Forbidden",
            Kind::NotFound => "NotFound",
            Kind::Conflict => "Conflict",
            Kind::TooManyRequests => "TooManyRequests",
            Kind::Unavailable => "ServiceUnavailable",
            Kind::BadGateway | Kind::Internal => "InternalError",
        }
    }

    /// The gRPC status code.
    pub fn grpc_code(self) -> i32 {
        match self {
            Kind::BadRequest => grpc::INVALID_ARGUMENT,
            Kind::Unauthenticated => grpc::UNAUTHENTICATED,
            Kind::Forbidden => grpc::PERMISSION_DENIED,
            Kind::NotFound => grpc::NOT_FOUND,
            Kind::Conflict => grpc::ALREADY_EXISTS,
            Kind::TooManyRequests => grpc::RESOURCE_EXHAUSTED,
            Kind::Unavailable | Kind::BadGateway => grpc::UNAVAILABLE,
            Kind::Internal => grpc::INTERNAL,
        }
    }
}

/// Why a request got no answer from an agent (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// No replica of the agent connected within the wait.
    AgentNotConnected,
    /// Connected, but no free tunnel within the wait.
    AgentBusy,
    /// The agent refused (a service its `service_access` does not allow).
    RefusedByAgent,
    /// The agent could not reach the cluster or service.
    UpstreamUnavailable,
    /// The tunnel broke before the agent answered.
    TunnelBroken,
    /// The control plane could not be read.
    ControlPlane,
    /// The agent named does not exist.
    UnknownAgent,
}

impl Failure {
    pub const ALL: [Failure; 7] = [
        Failure::AgentNotConnected,
        Failure::AgentBusy,
        Failure::RefusedByAgent,
        Failure::UpstreamUnavailable,
        Failure::TunnelBroken,
        Failure::ControlPlane,
        Failure::UnknownAgent,
    ];

    /// The label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::AgentNotConnected => "agent_not_connected",
            Failure::AgentBusy => "agent_busy",
            Failure::RefusedByAgent => "refused_by_agent",
            Failure::UpstreamUnavailable => "upstream_unavailable",
            Failure::TunnelBroken => "tunnel_broken",
            Failure::ControlPlane => "control_plane",
            Failure::UnknownAgent => "unknown_agent",
        }
    }

    /// Whether the request waited for an agent that did not come (a routing timeout).
    pub fn is_routing_timeout(self) -> bool {
        matches!(self, Failure::AgentNotConnected | Failure::AgentBusy)
    }

    fn kind_and_origin(self) -> (Kind, Origin) {
        match self {
            Failure::AgentNotConnected | Failure::AgentBusy => (Kind::Unavailable, Origin::Agent),
            Failure::RefusedByAgent => (Kind::Forbidden, Origin::Agent),
            Failure::UpstreamUnavailable | Failure::TunnelBroken => {
                (Kind::BadGateway, Origin::Cluster)
            }
            Failure::ControlPlane => (Kind::Unavailable, Origin::Internal),
            Failure::UnknownAgent => (Kind::NotFound, Origin::Client),
        }
    }
}

/// An error as kas shows it; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: Kind,
    pub origin: Origin,
    /// Set when the request got no answer from an agent.
    pub failure: Option<Failure>,
    /// Safe to show to the caller.
    pub message: String,
}

impl Error {
    pub fn new(kind: Kind, origin: Origin, message: impl Into<String>) -> Self {
        Error {
            kind,
            origin,
            failure: None,
            message: message.into(),
        }
    }

    /// A failure to get an answer from an agent.
    pub fn failure(failure: Failure, message: impl Into<String>) -> Self {
        let (kind, origin) = failure.kind_and_origin();
        Error {
            kind,
            origin,
            failure: Some(failure),
            message: message.into(),
        }
    }

    /// The caller's fault (a bad request).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Error::new(Kind::BadRequest, Origin::Client, message)
    }

    /// Missing or wrong credentials.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Error::new(Kind::Unauthenticated, Origin::Client, message)
    }

    /// Known, but not allowed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Error::new(Kind::Forbidden, Origin::Policy, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Error::new(Kind::NotFound, Origin::Client, message)
    }

    /// kas's own failure; the details belong in its log, not in `message`.
    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(Kind::Internal, Origin::Internal, message)
    }

    /// The control plane could not be read: retry later.
    pub fn control_plane() -> Self {
        Error::failure(
            Failure::ControlPlane,
            "kas cannot reach its control plane; retry later",
        )
    }

    pub fn http_status(&self) -> u16 {
        self.kind.http_status()
    }

    pub fn grpc_code(&self) -> i32 {
        self.kind.grpc_code()
    }

    /// A Kubernetes `Status` object, what kubectl and client libraries expect.
    pub fn status_object(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.kind.status_reason(),
            "code": self.http_status(),
        })
    }

    /// The JSON error body of the admin and application APIs.
    pub fn body(&self, with_code: bool) -> ErrorBody {
        ErrorBody {
            error: self.message.clone(),
            code: with_code.then_some(self.http_status()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The "errors by origin" table of docs/internals.md.
    #[test]
    fn every_origin_maps_to_one_status_on_every_surface() {
        let cases = [
            (
                Error::unauthenticated("bad token"),
                401,
                grpc::UNAUTHENTICATED,
                Origin::Client,
            ),
            (
                Error::forbidden("not in ci_access"),
                403,
                grpc::PERMISSION_DENIED,
                Origin::Policy,
            ),
            (
                Error::failure(Failure::AgentNotConnected, "x"),
                503,
                grpc::UNAVAILABLE,
                Origin::Agent,
            ),
            (
                Error::failure(Failure::AgentBusy, "x"),
                503,
                grpc::UNAVAILABLE,
                Origin::Agent,
            ),
            (
                Error::failure(Failure::RefusedByAgent, "x"),
                403,
                grpc::PERMISSION_DENIED,
                Origin::Agent,
            ),
            (
                Error::failure(Failure::TunnelBroken, "x"),
                502,
                grpc::UNAVAILABLE,
                Origin::Cluster,
            ),
            (
                Error::failure(Failure::UpstreamUnavailable, "x"),
                502,
                grpc::UNAVAILABLE,
                Origin::Cluster,
            ),
            (
                Error::control_plane(),
                503,
                grpc::UNAVAILABLE,
                Origin::Internal,
            ),
            (Error::internal("x"), 500, grpc::INTERNAL, Origin::Internal),
        ];
        for (e, http, grpc, origin) in cases {
            assert_eq!(
                (e.http_status(), e.grpc_code(), e.origin),
                (http, grpc, origin),
                "{e:?}"
            );
            let s = e.status_object();
            assert_eq!(s["code"], http);
            assert_eq!(s["kind"], "Status");
            assert_eq!(e.body(true).code, Some(http));
        }
        assert_eq!(
            Error::unauthenticated("x").status_object()["reason"],
            "Unauthorized"
        );
        let labels: std::collections::HashSet<_> =
            Failure::ALL.iter().map(|f| f.as_str()).collect();
        assert_eq!(labels.len(), Failure::ALL.len());
    }
}
