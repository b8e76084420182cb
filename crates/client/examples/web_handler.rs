//! A web handler that shows pod counts of an agent's cluster without ever waiting on
//! the cluster: it answers from a reactive cache (200 with the counts, or 202 "not
//! ready yet"), and a background task keeps the cache fresh.
//!
//! ```sh
//! KAS_URL=http://127.0.0.1:8153 KAS_APPLICATION_SECRET_FILE=app-secret AGENT_ID=1 \
//!   cargo run -p kas-client --example web_handler
//! curl http://127.0.0.1:3000/agents/1/pods
//! ```

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use kas_client::{CacheOptions, Cached, ClientOptions, KasClient, ReactiveCache};
use std::collections::BTreeMap;
use std::time::Duration;

type PodCounts = BTreeMap<String, usize>;

/// Pods per namespace of one agent's cluster (the slow cluster call, run in the background).
async fn count_pods(kas: KasClient, agent_id: u64) -> kas_client::Result<PodCounts> {
    let list = kas.agent(agent_id).core().list("pods", None).await?;
    let mut counts = PodCounts::new();
    for pod in list["items"].as_array().into_iter().flatten() {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
        *counts.entry(ns.to_string()).or_default() += 1;
    }
    Ok(counts)
}

/// The handler: never blocks on the cluster.
async fn pods(
    State(cache): State<ReactiveCache<u64, PodCounts>>,
    Path(agent_id): Path<u64>,
) -> impl IntoResponse {
    match cache.get(&agent_id) {
        Cached::Ready { value, age } => (
            StatusCode::OK,
            Json(serde_json::json!({"pods": *value, "age_seconds": age.as_secs()})),
        ),
        Cached::NotReady => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"status": "not ready yet, ask again"})),
        ),
        // Only a code reaches the page, never the cluster's words.
        Cached::Failed(e) => (
            StatusCode::BAD_GATEWAY,
            Json(serde_json::json!({"error": e.to_string()})),
        ),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("KAS_URL").unwrap_or_else(|_| "http://127.0.0.1:8153".into());
    let secret_file = std::env::var("KAS_APPLICATION_SECRET_FILE")
        .context("set KAS_APPLICATION_SECRET_FILE to kas's application.secret_file")?;
    let secret = std::fs::read(&secret_file).with_context(|| format!("read {secret_file}"))?;
    let kas = KasClient::new(
        ClientOptions {
            url,
            ca_pem: None,
            timeout: Duration::from_secs(10),
        },
        secret.trim_ascii(),
    )?;
    let cache = ReactiveCache::new(CacheOptions::default(), move |agent_id: u64| {
        Box::pin(count_pods(kas.clone(), agent_id))
    });
    let app = Router::new()
        .route("/agents/:id/pods", get(pods))
        .with_state(cache);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
