//! The resource types the test API server knows, its discovery documents, and how a
//! request path names a collection, an object or a subresource.

use serde_json::{json, Value};

/// One resource type.
#[derive(Debug)]
pub struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    /// Plural, lowercase: `pods`.
    pub resource: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short: &'static [&'static str],
    /// Subresources served (`exec`, `log`, `status`...).
    pub subresources: &'static [&'static str],
}

impl ResourceType {
    /// `group/resource` (`/pods` for the core group): the store's key.
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.resource)
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

const fn rt(
    group: &'static str,
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    subresources: &'static [&'static str],
) -> ResourceType {
    ResourceType {
        group,
        version: "v1",
        resource,
        kind,
        namespaced,
        short,
        subresources,
    }
}

const RBAC: &str = "rbac.authorization.k8s.io";

/// Every resource type served.
pub static TYPES: &[ResourceType] = &[
    rt("", "namespaces", "Namespace", false, &["ns"], &["status"]),
    rt(
        "",
        "pods",
        "Pod",
        true,
        &["po"],
        &["exec", "attach", "log", "portforward", "status"],
    ),
    rt("", "configmaps", "ConfigMap", true, &["cm"], &[]),
    rt("", "secrets", "Secret", true, &[], &[]),
    rt("", "services", "Service", true, &["svc"], &["status"]),
    rt(
        "",
        "serviceaccounts",
        "ServiceAccount",
        true,
        &["sa"],
        &["token"],
    ),
    rt(
        "",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        true,
        &["pvc"],
        &["status"],
    ),
    rt(
        "apps",
        "deployments",
        "Deployment",
        true,
        &["deploy"],
        &["status", "scale"],
    ),
    rt(RBAC, "clusterroles", "ClusterRole", false, &[], &[]),
    rt(
        RBAC,
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
        &[],
        &[],
    ),
    rt(RBAC, "roles", "Role", true, &[], &[]),
    rt(RBAC, "rolebindings", "RoleBinding", true, &[], &[]),
    rt(
        "policy",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        true,
        &["pdb"],
        &["status"],
    ),
];

/// The groups served under `/apis`, in discovery order.
const GROUPS: [&str; 3] = ["apps", RBAC, "policy"];

/// The type of `resource` in `group`.
pub fn find(group: &str, resource: &str) -> Option<&'static ResourceType> {
    TYPES
        .iter()
        .find(|t| t.group == group && t.resource == resource)
}

/// What a resource path names.
#[derive(Debug)]
pub enum Target<'a> {
    /// Every object of the type (in `ns`, when given).
    Collection {
        rt: &'static ResourceType,
        ns: Option<&'a str>,
    },
    /// One object (`ns` empty for cluster-scoped types).
    Object {
        rt: &'static ResourceType,
        ns: &'a str,
        name: &'a str,
    },
    /// A subresource of one object.
    Sub {
        rt: &'static ResourceType,
        ns: &'a str,
        name: &'a str,
        sub: &'a str,
    },
}

/// Parses `/api/v1/...` and `/apis/<group>/v1/...` paths (as segments).
pub fn target<'a>(segs: &[&'a str]) -> Option<Target<'a>> {
    let (group, rest) = match segs {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", g, "v1", rest @ ..] => (*g, rest),
        _ => return None,
    };
    let t = |r: &str| find(group, r);
    let namespaced = |r: &str| t(r).filter(|rt| rt.namespaced);
    let cluster = |r: &str| t(r).filter(|rt| !rt.namespaced);
    match rest {
        [r] => Some(Target::Collection {
            rt: t(r)?,
            ns: None,
        }),
        ["namespaces", ns, r] if namespaced(r).is_some() => Some(Target::Collection {
            rt: namespaced(r)?,
            ns: Some(ns),
        }),
        ["namespaces", ns, r, name] => Some(Target::Object {
            rt: namespaced(r)?,
            ns,
            name,
        }),
        ["namespaces", ns, r, name, sub] => {
            let rt = namespaced(r)?;
            rt.subresources
                .contains(sub)
                .then_some(Target::Sub { rt, ns, name, sub })
        }
        [r, name] => Some(Target::Object {
            rt: cluster(r)?,
            ns: "",
            name,
        }),
        [r, name, sub] => {
            let rt = cluster(r)?;
            rt.subresources.contains(sub).then_some(Target::Sub {
                rt,
                ns: "",
                name,
                sub,
            })
        }
        _ => None,
    }
}

const VERBS: [&str; 7] = [
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// The `APIResourceList` of one group version.
pub fn resource_list(group: &str) -> Option<Value> {
    if !group.is_empty() && !GROUPS.contains(&group) {
        return None;
    }
    let mut resources = Vec::new();
    for t in TYPES.iter().filter(|t| t.group == group) {
        resources.push(json!({
            "name": t.resource, "singularName": t.kind.to_ascii_lowercase(), "namespaced": t.namespaced,
            "kind": t.kind, "verbs": VERBS, "shortNames": t.short,
        }));
        for sub in t.subresources {
            let (kind, verbs) = match *sub {
                "exec" => ("PodExecOptions", json!(["create", "get"])),
                "attach" => ("PodAttachOptions", json!(["create", "get"])),
                "portforward" => ("PodPortForwardOptions", json!(["create", "get"])),
                "log" => (t.kind, json!(["get"])),
                "token" => ("TokenRequest", json!(["create"])),
                "scale" => ("Scale", json!(["get", "patch", "update"])),
                _ => (t.kind, json!(["get", "patch", "update"])),
            };
            resources.push(json!({
                "name": format!("{}/{sub}", t.resource), "singularName": "", "namespaced": t.namespaced,
                "kind": kind, "verbs": verbs,
            }));
        }
    }
    let gv = if group.is_empty() {
        "v1".to_string()
    } else {
        format!("{group}/v1")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

/// `/api`.
pub fn core_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]})
}

/// `/apis`.
pub fn groups() -> Value {
    let g = |name: &str| json!({"name": name, "versions": [{"groupVersion": format!("{name}/v1"), "version": "v1"}], "preferredVersion": {"groupVersion": format!("{name}/v1"), "version": "v1"}});
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": GROUPS.iter().map(|n| g(n)).collect::<Vec<_>>()})
}

/// `/openapi/v3`: one document per group version.
pub fn openapi_index() -> Value {
    let mut paths = serde_json::Map::new();
    paths.insert(
        "api/v1".into(),
        json!({"serverRelativeURL": "/openapi/v3/api/v1?hash=kas-test"}),
    );
    for g in GROUPS {
        paths.insert(
            format!("apis/{g}/v1"),
            json!({"serverRelativeURL": format!("/openapi/v3/apis/{g}/v1?hash=kas-test")}),
        );
    }
    json!({ "paths": paths })
}

/// Just enough OpenAPI v3 for kubectl to see that the server validates fields itself
/// (`fieldValidation` on writes), so it sends `fieldValidation=Strict` instead of
/// downloading schemas for client-side validation.
pub fn openapi(group: &str) -> Option<Value> {
    if !group.is_empty() && !GROUPS.contains(&group) {
        return None;
    }
    let mut paths = serde_json::Map::new();
    for t in TYPES.iter().filter(|t| t.group == group) {
        let prefix = if group.is_empty() {
            "/api/v1".to_string()
        } else {
            format!("/apis/{group}/v1")
        };
        let path = if t.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", t.resource)
        } else {
            format!("{prefix}/{}/{{name}}", t.resource)
        };
        let gvk = json!({"group": group, "version": "v1", "kind": t.kind});
        let params = json!([{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}, {"name": "dryRun", "in": "query", "schema": {"type": "string"}}]);
        paths.insert(path, json!({
            "patch": {"operationId": format!("patch{}", t.kind), "parameters": params, "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}},
            "put": {"operationId": format!("replace{}", t.kind), "parameters": params, "x-kubernetes-group-version-kind": gvk, "responses": {"200": {"description": "OK"}}},
        }));
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "kas test API server", "version": "v1.32.0"}, "paths": paths, "components": {"schemas": {}}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_collections_objects_and_subresources() {
        let t = |p: &str| {
            let segs: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
            match target(&segs) {
                Some(Target::Collection { rt, ns }) => format!("list {} {ns:?}", rt.key()),
                Some(Target::Object { rt, ns, name }) => format!("get {} {ns} {name}", rt.key()),
                Some(Target::Sub { rt, ns, name, sub }) => {
                    format!("sub {} {ns} {name} {sub}", rt.key())
                }
                None => "none".into(),
            }
        };
        assert_eq!(t("/api/v1/pods"), "list /pods None");
        assert_eq!(t("/api/v1/namespaces"), "list /namespaces None");
        assert_eq!(t("/api/v1/namespaces/shop"), "get /namespaces  shop");
        assert_eq!(
            t("/api/v1/namespaces/shop/pods"),
            "list /pods Some(\"shop\")"
        );
        assert_eq!(t("/api/v1/namespaces/shop/pods/a"), "get /pods shop a");
        assert_eq!(
            t("/api/v1/namespaces/shop/pods/a/exec"),
            "sub /pods shop a exec"
        );
        assert_eq!(
            t("/apis/rbac.authorization.k8s.io/v1/clusterroles/view"),
            "get rbac.authorization.k8s.io/clusterroles  view"
        );
        assert_eq!(
            t("/apis/apps/v1/namespaces/x/deployments/web/status"),
            "sub apps/deployments x web status"
        );
        assert_eq!(t("/api/v1/pods/a"), "none");
        assert_eq!(t("/api/v1/namespaces/shop/pods/a/nope"), "none");
        assert_eq!(t("/apis/nope/v1/things"), "none");
    }
}
