//! The application API (kas's API listener, under [`PREFIX`], an HS256 JWT with
//! audience [`AUDIENCE`] as bearer).

use serde::{Deserialize, Serialize};

/// Where the application API lives on the API listener.
pub const PREFIX: &str = "/application/v1";

/// The audience application tokens must name.
pub const AUDIENCE: &str = "kas-application";

/// An agent and its connection state, as `GET /agents` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub id: u64,
    pub name: String,
    pub config_project: String,
    pub connected: bool,
    pub replicas: usize,
    /// The kas instances holding its connections (when there are several).
    pub kas: Vec<String>,
    /// Unix seconds of its oldest live connection.
    pub connected_since: Option<u64>,
    pub agent_versions: Vec<String>,
}
