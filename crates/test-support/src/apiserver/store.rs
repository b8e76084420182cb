//! Objects in memory and the generic operations on them: list, get, create, update,
//! patch (merge, strategic as merge, server-side apply), delete, watch, with label and
//! field selectors, dry runs, tables for `kubectl get`, and the small controllers that
//! make deployments roll out and pods become ready.

// Operations answer a refusal with the HTTP response to send, which is large by nature.
#![allow(clippy::result_large_err)]

use super::resources::{ResourceType, TYPES};
use super::{json_resp, status, Body, State, StreamGuard};
use crate::time::{now_secs, rfc3339};
use bytes::Bytes;
use http::{header, HeaderMap, Method, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Everything stored: `group/resource` -> (namespace, name) -> object.
pub struct Store {
    pub rv: u64,
    pub objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
}

/// A change, as watches see it.
#[derive(Clone)]
pub struct Event {
    pub key: String,
    pub namespace: String,
    pub change: &'static str,
    pub object: Value,
}

impl Store {
    /// The objects a fresh server starts with: a few namespaces and pods, a
    /// deployment, and the bootstrap cluster roles.
    pub fn seeded() -> Store {
        let mut s = Store {
            rv: 1,
            objects: BTreeMap::new(),
        };
        for t in TYPES {
            s.objects.entry(t.key()).or_default();
        }
        for ns in ["default", "kube-system", "shop"] {
            s.insert_seed(
                "/namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}, "status": {"phase": "Active"}}),
            );
        }
        for (ns, name) in [
            ("default", "web-0"),
            ("default", "web-1"),
            ("kube-system", "coredns-0"),
            ("shop", "cart-0"),
        ] {
            s.insert_seed("/pods", running_pod(name, ns));
        }
        s.insert_seed(
            "apps/deployments",
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "default", "generation": 1},
                "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "registry.example/web:1"}]}}},
                "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}}),
        );
        for role in super::rbac::bootstrap_roles() {
            s.insert_seed("rbac.authorization.k8s.io/clusterroles", role);
        }
        s
    }

    fn insert_seed(&mut self, key: &str, mut o: Value) {
        self.rv += 1;
        let ns = o["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = o["metadata"]["name"].as_str().unwrap_or("").to_string();
        let created = now_secs() - 300;
        fill_meta(&mut o, self.rv, created);
        self.objects
            .entry(key.to_string())
            .or_default()
            .insert((ns, name), o);
    }

    /// The objects of type `key`, all or in one namespace.
    pub fn list(&self, key: &str, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .get(key)
            .map(|m| {
                m.iter()
                    .filter(|((n, _), _)| ns.is_none_or(|x| x == n))
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn get(&self, key: &str, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(key)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
    }
}

/// A pod that is running and ready.
pub fn running_pod(name: &str, ns: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"containers": [{"name": "main", "image": "registry.example/app:1"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0}]},
    })
}

/// Sets the server-owned metadata of a new object.
fn fill_meta(o: &mut Value, rv: u64, created: i64) {
    let m = &mut o["metadata"];
    if !m.is_object() {
        *m = json!({});
    }
    m["uid"] = json!(format!(
        "{:08x}-0000-4000-8000-{:012x}",
        rand::random::<u32>(),
        rand::random::<u64>() & 0xffff_ffff_ffff
    ));
    m["resourceVersion"] = json!(rv.to_string());
    m["creationTimestamp"] = json!(rfc3339(created));
    if m.get("generation").is_none() {
        m["generation"] = json!(1);
    }
    if let Some(obj) = m.as_object_mut() {
        obj.remove("managedFields");
    }
}

fn rv_of(o: &Value) -> u64 {
    o["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Query parameters of a request.
pub struct Params(pub Vec<(String, String)>);

impl Params {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
    fn dry_run(&self) -> bool {
        self.get("dryRun").is_some()
    }
    fn watch(&self) -> bool {
        matches!(self.get("watch"), Some("true" | "1"))
    }
}

/// Whether `o` matches the request's `labelSelector` and `fieldSelector` (equality
/// terms only, which is what kubectl sends).
fn selected(o: &Value, p: &Params) -> bool {
    let terms = |s: Option<&str>| -> Vec<(String, String, bool)> {
        s.unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
            .filter_map(|t| {
                if let Some((k, v)) = t.split_once("!=") {
                    Some((k.to_string(), v.to_string(), false))
                } else {
                    let (k, v) = t.split_once("==").or_else(|| t.split_once('='))?;
                    Some((k.to_string(), v.to_string(), true))
                }
            })
            .collect()
    };
    let labels_ok = terms(p.get("labelSelector"))
        .iter()
        .all(|(k, v, eq)| (o["metadata"]["labels"][k].as_str() == Some(v.as_str())) == *eq);
    let fields_ok = terms(p.get("fieldSelector")).iter().all(|(k, v, eq)| {
        let mut cur = o;
        for part in k.split('.') {
            cur = &cur[part];
        }
        (cur.as_str() == Some(v.as_str())) == *eq
    });
    labels_ok && fields_ok
}

/// Announces a change to watches.
fn announce(state: &State, key: &str, ns: &str, change: &'static str, object: &Value) {
    let _ = state.events.send(Event {
        key: key.to_string(),
        namespace: ns.to_string(),
        change,
        object: object.clone(),
    });
}

fn not_found(rt: &ResourceType, name: &str) -> super::Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", rt.resource),
    )
}

fn wants_table(h: &HeaderMap) -> bool {
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

/// Parses a request body: JSON, or YAML for server-side apply.
fn parse_body(body: &[u8], yaml: bool) -> Result<Value, super::Response<Body>> {
    let parsed = if yaml {
        serde_yaml_ng::from_slice::<Value>(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice::<Value>(body).map_err(|e| e.to_string())
    };
    match parsed {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not an object",
        )),
        Err(e) => Err(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("the body cannot be decoded: {e}"),
        )),
    }
}

/// GET, POST on a collection.
pub async fn collection(
    state: &Arc<State>,
    method: &Method,
    headers: &HeaderMap,
    body: Bytes,
    rt: &'static ResourceType,
    ns: Option<&str>,
    p: &Params,
) -> super::Response<Body> {
    let key = rt.key();
    match *method {
        Method::GET if p.watch() => watch(state, rt, ns, p, wants_table(headers)),
        Method::GET => {
            let st = state.lock();
            let items: Vec<Value> = st
                .list(&key, ns)
                .into_iter()
                .filter(|o| selected(o, p))
                .collect();
            let rv = st.rv;
            drop(st);
            if wants_table(headers) {
                json_resp(StatusCode::OK, &table(rt, rv, &items))
            } else {
                json_resp(
                    StatusCode::OK,
                    &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
                )
            }
        }
        Method::POST => {
            let obj = match parse_body(&body, false) {
                Ok(o) => o,
                Err(r) => return r,
            };
            match create(state, rt, ns.unwrap_or(""), obj, p.dry_run()) {
                Ok(o) => json_resp(StatusCode::CREATED, &o),
                Err(r) => r,
            }
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        ),
    }
}

/// Stores a new object (unless `dry_run`); its name may be generated.
pub fn create(
    state: &Arc<State>,
    rt: &'static ResourceType,
    ns: &str,
    mut obj: Value,
    dry_run: bool,
) -> Result<Value, super::Response<Body>> {
    let name = match (
        obj["metadata"]["name"].as_str(),
        obj["metadata"]["generateName"].as_str(),
    ) {
        (Some(n), _) if !n.is_empty() => n.to_string(),
        (_, Some(g)) => format!("{g}{:05x}", rand::random::<u32>() & 0xfffff),
        _ => {
            return Err(status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name: Required value",
            ))
        }
    };
    let key = rt.key();
    let mut st = state.lock();
    if st.get(&key, ns, &name).is_some() {
        return Err(status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", rt.resource),
        ));
    }
    obj["metadata"]["name"] = json!(name);
    if rt.namespaced {
        obj["metadata"]["namespace"] = json!(ns);
    }
    obj["apiVersion"] = json!(rt.api_version());
    obj["kind"] = json!(rt.kind);
    let rv = st.rv + 1;
    fill_meta(&mut obj, rv, now_secs());
    initial_status(rt, &mut obj);
    if dry_run {
        return Ok(obj);
    }
    st.rv = rv;
    st.objects
        .entry(key.clone())
        .or_default()
        .insert((ns.to_string(), name), obj.clone());
    drop(st);
    announce(state, &key, ns, "ADDED", &obj);
    super::controllers::created(state, rt, &obj);
    Ok(obj)
}

/// What a new object's status is before any controller looked at it.
fn initial_status(rt: &ResourceType, o: &mut Value) {
    match rt.resource {
        "pods" if o["status"].is_null() => o["status"] = json!({"phase": "Pending"}),
        "namespaces" => o["status"] = json!({"phase": "Active"}),
        "deployments" => o["status"] = json!({}),
        _ => {}
    }
}

/// GET, PUT, PATCH, DELETE on one object (or its `status` subresource).
#[allow(clippy::too_many_arguments)]
pub async fn object(
    state: &Arc<State>,
    method: &Method,
    headers: &HeaderMap,
    body: Bytes,
    rt: &'static ResourceType,
    ns: &str,
    name: &str,
    status_only: bool,
    p: &Params,
) -> super::Response<Body> {
    let key = rt.key();
    match *method {
        Method::GET => {
            let st = state.lock();
            match st.get(&key, ns, name) {
                Some(o) if wants_table(headers) => {
                    json_resp(StatusCode::OK, &table(rt, st.rv, std::slice::from_ref(o)))
                }
                Some(o) => json_resp(StatusCode::OK, o),
                None => not_found(rt, name),
            }
        }
        Method::DELETE => delete(state, rt, ns, name, p.dry_run()),
        Method::PUT | Method::PATCH => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json");
            let apply = ct.starts_with("application/apply-patch");
            let input = match parse_body(&body, apply) {
                Ok(v) => v,
                Err(r) => return r,
            };
            if *method == Method::PATCH && ct.starts_with("application/json-patch") {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "JSON patches are not supported by this test server; use a merge patch",
                );
            }
            let mut input = input;
            if ct.starts_with("application/strategic-merge-patch") {
                strip_directives(&mut input);
            }
            let how = match (*method == Method::PUT, apply) {
                (true, _) => Write::Replace,
                (false, true) => Write::Apply,
                (false, false) => Write::Merge,
            };
            match write(state, rt, ns, name, input, how, status_only, p.dry_run()) {
                Ok((o, created)) => json_resp(
                    if created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    },
                    &o,
                ),
                Err(r) => r,
            }
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        ),
    }
}

/// How a write changes an object.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// PUT: the new object (metadata the server owns is kept).
    Replace,
    /// A JSON merge patch (strategic merge patches are applied as merge patches).
    Merge,
    /// Server-side apply: merged like a merge patch; creates a missing object.
    Apply,
}

/// Changes an object; returns it and whether it was created (by an apply).
#[allow(clippy::too_many_arguments)]
pub fn write(
    state: &Arc<State>,
    rt: &'static ResourceType,
    ns: &str,
    name: &str,
    input: Value,
    how: Write,
    status_only: bool,
    dry_run: bool,
) -> Result<(Value, bool), super::Response<Body>> {
    let key = rt.key();
    let mut st = state.lock();
    let Some(current) = st.get(&key, ns, name).cloned() else {
        drop(st);
        if how == Write::Apply {
            return create(state, rt, ns, input, dry_run).map(|o| (o, true));
        }
        return Err(not_found(rt, name));
    };
    let mut next = current.clone();
    match (how, status_only) {
        (_, true) => match how {
            Write::Replace => next["status"] = input["status"].clone(),
            _ => merge_patch(&mut next["status"], &input["status"]),
        },
        (Write::Replace, false) => {
            next = input;
            next["status"] = current["status"].clone();
        }
        (Write::Merge | Write::Apply, false) => {
            let mut patch = input;
            if let Some(m) = patch["metadata"].as_object_mut() {
                for owned in [
                    "uid",
                    "resourceVersion",
                    "creationTimestamp",
                    "generation",
                    "managedFields",
                ] {
                    m.remove(owned);
                }
            }
            if let Some(o) = patch.as_object_mut() {
                o.remove("status");
            }
            merge_patch(&mut next, &patch);
        }
    }
    // What the server owns stays.
    for owned in ["uid", "creationTimestamp", "name", "namespace"] {
        next["metadata"][owned] = current["metadata"][owned].clone();
    }
    if !rt.namespaced {
        if let Some(m) = next["metadata"].as_object_mut() {
            m.remove("namespace");
        }
    }
    next["apiVersion"] = json!(rt.api_version());
    next["kind"] = json!(rt.kind);
    let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
    let spec_changed = !status_only && next["spec"] != current["spec"];
    next["metadata"]["generation"] = json!(generation + i64::from(spec_changed));
    let rv = st.rv + 1;
    next["metadata"]["resourceVersion"] = json!(rv.to_string());
    if dry_run {
        return Ok((next, false));
    }
    st.rv = rv;
    st.objects
        .entry(key.clone())
        .or_default()
        .insert((ns.to_string(), name.to_string()), next.clone());
    drop(st);
    announce(state, &key, ns, "MODIFIED", &next);
    if spec_changed {
        super::controllers::changed(state, rt, &next);
    }
    Ok((next, false))
}

/// Removes an object (a namespace with everything in it).
pub fn delete(
    state: &Arc<State>,
    rt: &'static ResourceType,
    ns: &str,
    name: &str,
    dry_run: bool,
) -> super::Response<Body> {
    let key = rt.key();
    let mut st = state.lock();
    let Some(current) = st.get(&key, ns, name).cloned() else {
        return not_found(rt, name);
    };
    if dry_run {
        return json_resp(StatusCode::OK, &current);
    }
    st.rv += 1;
    let rv = st.rv;
    let mut gone = vec![(key.clone(), ns.to_string(), current)];
    if rt.resource == "namespaces" && rt.group.is_empty() {
        for (k, m) in st.objects.iter() {
            for ((n, _), o) in m.iter().filter(|((n, _), _)| n == name) {
                gone.push((k.clone(), n.clone(), o.clone()));
            }
        }
    }
    for (k, n, o) in &gone {
        let oname = o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(m) = st.objects.get_mut(k) {
            m.remove(&(n.clone(), oname));
        }
    }
    drop(st);
    let mut removed = Value::Null;
    for (k, n, mut o) in gone {
        // Deletion is a change with its own resource version.
        o["metadata"]["resourceVersion"] = json!(rv.to_string());
        announce(state, &k, &n, "DELETED", &o);
        if removed.is_null() {
            removed = o;
        }
    }
    json_resp(StatusCode::OK, &removed)
}

/// Removes strategic merge patch directives (`$patch`, `$setElementOrder/...`): a
/// strategic merge patch is applied as a plain merge patch here.
fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            m.values_mut().for_each(strip_directives);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

pub fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// A watch: the objects changed after the requested resource version, then every
/// change as it happens, until the client goes or `timeoutSeconds` passes.
fn watch(
    state: &Arc<State>,
    rt: &'static ResourceType,
    ns: Option<&str>,
    p: &Params,
    table_wanted: bool,
) -> super::Response<Body> {
    let key = rt.key();
    let since: u64 = p
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = p
        .get("timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let filter = Params(p.0.clone());
    // Subscribe before reading the store, so no change falls between the two.
    let mut rx = state.events.subscribe();
    let mut initial: Vec<Value> = state
        .lock()
        .list(&key, ns)
        .into_iter()
        .filter(|o| rv_of(o) > since && selected(o, &filter))
        .collect();
    initial.sort_by_key(rv_of);
    let mut sent_rv = initial.iter().map(rv_of).max().unwrap_or(since);
    let guard = StreamGuard::new(state);
    let (tx, out) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    let encode = move |t: &str, o: &Value| {
        let object = if table_wanted {
            table(rt, 0, std::slice::from_ref(o))
        } else {
            o.clone()
        };
        Bytes::from(format!("{}\n", json!({"type": t, "object": object})))
    };
    let ns = ns.map(str::to_string);
    tokio::spawn(async move {
        let _guard = guard;
        let deadline = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        for o in &initial {
            if tx.send(Ok(Frame::data(encode("ADDED", o)))).await.is_err() {
                return;
            }
        }
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(e) if e.key == key && ns.as_ref().is_none_or(|n| *n == e.namespace) && selected(&e.object, &filter) => {
                        let rv = rv_of(&e.object);
                        if rv > sent_rv {
                            sent_rv = rv;
                            if tx.send(Ok(Frame::data(encode(e.change, &e.object)))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            }
        }
    });
    let mut r = super::Response::new(
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(out)).boxed_unsync(),
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A `meta.k8s.io/v1` Table of `items`, as `kubectl get` asks for.
pub fn table(rt: &ResourceType, rv: u64, items: &[Value]) -> Value {
    let col = |n: &str, t: &str| json!({"name": n, "type": t, "format": if n == "Name" { "name" } else { "" }, "description": n, "priority": 0});
    // Columns, and the cells after the name of one object.
    type Cells = fn(&Value) -> Vec<Value>;
    let (cols, cells): (Vec<Value>, Cells) = match rt.resource {
        "pods" => (
            vec![
                col("Name", "string"),
                col("Ready", "string"),
                col("Status", "string"),
                col("Restarts", "integer"),
                col("Age", "string"),
            ],
            |o| {
                let ready = o["status"]["containerStatuses"]
                    .as_array()
                    .map(|c| c.iter().filter(|s| s["ready"] == true).count())
                    .unwrap_or(0);
                let total = o["spec"]["containers"]
                    .as_array()
                    .map(Vec::len)
                    .unwrap_or(1);
                vec![
                    json!(format!("{ready}/{total}")),
                    json!(o["status"]["phase"].as_str().unwrap_or("Pending")),
                    json!(0),
                    json!("5m"),
                ]
            },
        ),
        "configmaps" => (
            vec![
                col("Name", "string"),
                col("Data", "integer"),
                col("Age", "string"),
            ],
            |o| {
                vec![
                    json!(o["data"].as_object().map(|m| m.len()).unwrap_or(0)),
                    json!("5m"),
                ]
            },
        ),
        "deployments" => (
            vec![
                col("Name", "string"),
                col("Ready", "string"),
                col("Up-to-date", "integer"),
                col("Available", "integer"),
                col("Age", "string"),
            ],
            |o| {
                let s = &o["status"];
                vec![
                    json!(format!(
                        "{}/{}",
                        s["readyReplicas"].as_i64().unwrap_or(0),
                        o["spec"]["replicas"].as_i64().unwrap_or(1)
                    )),
                    json!(s["updatedReplicas"].as_i64().unwrap_or(0)),
                    json!(s["availableReplicas"].as_i64().unwrap_or(0)),
                    json!("5m"),
                ]
            },
        ),
        "namespaces" => (
            vec![
                col("Name", "string"),
                col("Status", "string"),
                col("Age", "string"),
            ],
            |o| {
                vec![
                    json!(o["status"]["phase"].as_str().unwrap_or("Active")),
                    json!("5m"),
                ]
            },
        ),
        _ => (vec![col("Name", "string"), col("Age", "string")], |_| {
            vec![json!("5m")]
        }),
    };
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut c = vec![o["metadata"]["name"].clone()];
            c.extend(cells(o));
            json!({"cells": c, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}})
        })
        .collect();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": cols,
        "rows": rows,
    })
}
