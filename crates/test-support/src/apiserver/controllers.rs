//! Tiny stand-ins for the cluster's controllers, so watch-driven clients have changes
//! to wait for: a deployment rolls out shortly after its spec changes, and a pod goes
//! through the phases its test chose.
//!
//! A pod's phases come from its annotation `test.kas.dev/phases`, a comma-separated
//! list of `<Phase>@<milliseconds after creation>` (for example
//! `Running@100,Failed@400`); without it a pod is Running and Ready after 50 ms. A
//! Running pod is Ready; Succeeded and Failed pods are not.

use super::resources::{self, ResourceType};
use super::store::{self, Write};
use super::State;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// The annotation that chooses a pod's phases.
pub const PHASES_ANNOTATION: &str = "test.kas.dev/phases";

/// A new object: start what a controller would do with it.
pub(crate) fn created(state: &Arc<State>, rt: &'static ResourceType, o: &Value) {
    match rt.resource {
        "pods" => pod_lifecycle(state, o),
        "deployments" => roll_out(state, o),
        _ => {}
    }
}

/// An object whose spec changed.
pub(crate) fn changed(state: &Arc<State>, rt: &'static ResourceType, o: &Value) {
    if rt.resource == "deployments" {
        roll_out(state, o);
    }
}

fn names(o: &Value) -> (String, String) {
    (
        o["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        o["metadata"]["name"].as_str().unwrap_or("").to_string(),
    )
}

/// The phases of a pod: (phase, delay after creation).
pub fn phases(o: &Value) -> Vec<(String, Duration)> {
    parse_phases(
        o["metadata"]["annotations"][PHASES_ANNOTATION]
            .as_str()
            .unwrap_or("Running@50"),
    )
}

/// `<Phase>@<ms>,...` as (phase, delay after creation).
pub fn parse_phases(spec: &str) -> Vec<(String, Duration)> {
    spec.split(',')
        .filter_map(|p| {
            let (phase, ms) = p.trim().split_once('@')?;
            Some((
                phase.to_string(),
                Duration::from_millis(ms.trim().parse().ok()?),
            ))
        })
        .collect()
}

pub(crate) fn pod_status(phase: &str, o: &Value) -> Value {
    let ready = phase == "Running";
    let containers: Vec<Value> = o["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let state = match phase {
                "Running" => json!({"running": {"startedAt": crate::time::rfc3339(crate::time::now_secs())}}),
                "Succeeded" => json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
                "Failed" => json!({"terminated": {"exitCode": 1, "reason": "Error"}}),
                _ => json!({"waiting": {"reason": "ContainerCreating"}}),
            };
            json!({"name": c["name"], "ready": ready, "restartCount": 0, "state": state, "image": c["image"]})
        })
        .collect();
    json!({
        "phase": phase,
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        "containerStatuses": containers,
    })
}

fn pod_lifecycle(state: &Arc<State>, o: &Value) {
    let (ns, name) = names(o);
    let uid = o["metadata"]["uid"].clone();
    // The annotation wins; then what the test planned for this pod's name.
    let planned = state.planned(&ns, &name).and_then(|p| p.phases);
    let steps = match (&o["metadata"]["annotations"][PHASES_ANNOTATION], planned) {
        (Value::Null, Some(spec)) => parse_phases(&spec),
        _ => phases(o),
    };
    let state = state.clone();
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let Some(rt) = resources::find("", "pods") else {
            return;
        };
        for (phase, at) in steps {
            tokio::time::sleep_until(start + at).await;
            // The pod may be gone, or replaced by another of the same name.
            let current = state.lock().get(&rt.key(), &ns, &name).cloned();
            let Some(current) = current.filter(|c| c["metadata"]["uid"] == uid) else {
                return;
            };
            let s = pod_status(&phase, &current);
            let _ = store::write(
                &state,
                rt,
                &ns,
                &name,
                json!({"status": s}),
                Write::Replace,
                true,
                false,
            );
        }
    });
}

fn roll_out(state: &Arc<State>, o: &Value) {
    let (ns, name) = names(o);
    let generation = o["metadata"]["generation"].as_i64().unwrap_or(1);
    let replicas = o["spec"]["replicas"].as_i64().unwrap_or(1);
    let state = state.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let Some(rt) = resources::find("apps", "deployments") else {
            return;
        };
        let s = json!({"status": {
            "observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
            "readyReplicas": replicas, "availableReplicas": replicas,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
            ],
        }});
        let _ = store::write(&state, rt, &ns, &name, s, Write::Replace, true, false);
    });
}
