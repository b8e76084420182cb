//! Authorization the way kube-apiserver's RBAC authorizer decides it (for the parts
//! tests need): roles and cluster roles with rules on verbs, API groups, resources
//! (`*`, `resource/subresource`, `*/subresource`) and resource names, bound to users,
//! groups and service accounts; `system:masters` may do anything. Impersonation is
//! checked like kube-apiserver's filter: the requester needs `impersonate` on the user
//! (or service account), each group, the uid and each extra value.

use super::store::Store;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// An authenticated user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl User {
    /// A service account's user, with the groups kube-apiserver gives it.
    pub fn service_account(namespace: &str, name: &str) -> User {
        User {
            name: format!("system:serviceaccount:{namespace}:{name}"),
            uid: String::new(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            extra: BTreeMap::new(),
        }
    }

    /// A cluster administrator (`system:masters`).
    pub fn admin() -> User {
        User {
            name: "kubernetes-admin".into(),
            uid: String::new(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
            extra: BTreeMap::new(),
        }
    }
}

/// What a request asks to do.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    /// Empty at the cluster scope.
    pub namespace: &'a str,
    /// Empty for collections.
    pub name: &'a str,
}

impl Attributes<'_> {
    /// kube-apiserver's wording of a refusal.
    pub fn forbidden(&self, user: &User) -> String {
        let resource = if self.subresource.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        };
        let what = if self.name.is_empty() {
            format!("{resource} is forbidden")
        } else {
            format!("{} \"{}\" is forbidden", self.resource, self.name)
        };
        let scope = if self.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{}\"", self.namespace)
        };
        format!(
            "{what}: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
            user.name, self.verb, self.group
        )
    }
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let has = |field: &str, want: &str| {
        let list = strs(&rule[field]);
        list.contains(&"*") || list.contains(&want)
    };
    if !has("verbs", a.verb) || !has("apiGroups", a.group) {
        return false;
    }
    let combined = if a.subresource.is_empty() {
        a.resource.to_string()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let resource_ok = strs(&rule["resources"]).iter().any(|r| {
        *r == "*"
            || *r == combined
            || (!a.subresource.is_empty() && r.strip_prefix("*/") == Some(a.subresource))
    });
    let names = strs(&rule["resourceNames"]);
    resource_ok && (names.is_empty() || names.contains(&a.name))
}

fn subject_matches(s: &Value, user: &User) -> bool {
    let name = s["name"].as_str().unwrap_or_default();
    match s["kind"].as_str() {
        Some("User") => user.name == name,
        Some("Group") => user.groups.iter().any(|g| g == name),
        Some("ServiceAccount") => {
            user.name
                == format!(
                    "system:serviceaccount:{}:{name}",
                    s["namespace"].as_str().unwrap_or_default()
                )
        }
        _ => false,
    }
}

/// Whether `user` may do `a`.
pub fn authorize(store: &Store, user: &User, a: &Attributes) -> bool {
    if user.groups.iter().any(|g| g == "system:masters") {
        return true;
    }
    let rules_of = |kind: &str, name: &str, ns: &str| -> Vec<Value> {
        let key = match kind {
            "ClusterRole" => "rbac.authorization.k8s.io/clusterroles",
            _ => "rbac.authorization.k8s.io/roles",
        };
        let ns = if kind == "ClusterRole" { "" } else { ns };
        store
            .get(key, ns, name)
            .and_then(|r| r["rules"].as_array().cloned())
            .unwrap_or_default()
    };
    let binding_allows = |b: &Value, ns: &str| {
        let bound = b["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| subject_matches(s, user));
        bound
            && rules_of(
                b["roleRef"]["kind"].as_str().unwrap_or_default(),
                b["roleRef"]["name"].as_str().unwrap_or_default(),
                ns,
            )
            .iter()
            .any(|r| rule_allows(r, a))
    };
    let cluster = store
        .list("rbac.authorization.k8s.io/clusterrolebindings", None)
        .iter()
        .any(|b| binding_allows(b, ""));
    cluster
        || (!a.namespace.is_empty()
            && store
                .list("rbac.authorization.k8s.io/rolebindings", Some(a.namespace))
                .iter()
                .any(|b| binding_allows(b, a.namespace)))
}

/// What the `Impersonate-*` headers ask for.
#[derive(Debug, Default)]
pub struct Requested {
    pub user: Option<String>,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl Requested {
    pub fn is_empty(&self) -> bool {
        self.user.is_none() && self.uid.is_none() && self.groups.is_empty() && self.extra.is_empty()
    }
}

/// Checks that `requester` may impersonate what is requested, and returns the user
/// the request then runs as; `Err` is the refusal's message.
pub fn impersonate(store: &Store, requester: &User, r: &Requested) -> Result<User, String> {
    let Some(username) = &r.user else {
        return Err(
            "requested an impersonation of groups, a uid or extras without impersonating a user"
                .into(),
        );
    };
    let check = |group: &'static str, resource: &'static str, sub: &str, ns: &str, name: &str| {
        let a = Attributes {
            verb: "impersonate",
            group,
            resource,
            subresource: sub,
            namespace: ns,
            name,
        };
        if authorize(store, requester, &a) {
            Ok(())
        } else {
            Err(a.forbidden(requester))
        }
    };
    match username
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
    {
        Some((ns, sa)) => check("", "serviceaccounts", "", ns, sa)?,
        None => check("", "users", "", "", username)?,
    }
    for g in &r.groups {
        check("", "groups", "", "", g)?;
    }
    if let Some(uid) = &r.uid {
        check("authentication.k8s.io", "uids", "", "", uid)?;
    }
    for (k, vals) in &r.extra {
        for v in vals {
            check("authentication.k8s.io", "userextras", k, "", v)?;
        }
    }
    let mut groups = r.groups.clone();
    if username != "system:anonymous" && !groups.iter().any(|g| g == "system:authenticated") {
        groups.push("system:authenticated".into());
    }
    Ok(User {
        name: username.clone(),
        uid: r.uid.clone().unwrap_or_default(),
        groups,
        extra: r.extra.clone(),
    })
}

/// The cluster roles every cluster starts with (simplified): `cluster-admin`, `admin`,
/// `edit` and `view`.
pub fn bootstrap_roles() -> Vec<Value> {
    let role = |name: &str, rules: Value| json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name}, "rules": rules});
    let readable = json!([
        "pods",
        "pods/log",
        "pods/status",
        "configmaps",
        "services",
        "serviceaccounts",
        "persistentvolumeclaims",
        "namespaces",
        "deployments",
        "deployments/status",
        "poddisruptionbudgets",
        "events",
    ]);
    vec![
        role(
            "cluster-admin",
            json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}, {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
        ),
        role(
            "admin",
            json!([
                {"apiGroups": ["", "apps", "policy"], "resources": ["*"], "verbs": ["*"]},
                {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["*"]},
            ]),
        ),
        role(
            "edit",
            json!([{"apiGroups": ["", "apps", "policy"], "resources": ["*"], "verbs": ["*"]}]),
        ),
        role(
            "view",
            json!([{"apiGroups": ["", "apps", "policy"], "resources": readable, "verbs": ["get", "list", "watch"]}]),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(objects: &[(&str, Value)]) -> Store {
        let mut s = Store::seeded();
        for (key, o) in objects {
            let ns = o["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let name = o["metadata"]["name"].as_str().unwrap_or("").to_string();
            s.objects
                .entry(key.to_string())
                .or_default()
                .insert((ns, name), o.clone());
        }
        s
    }

    fn crb(name: &str, role: &str, subject: Value) -> (&'static str, Value) {
        (
            "rbac.authorization.k8s.io/clusterrolebindings",
            json!({"metadata": {"name": name}, "roleRef": {"kind": "ClusterRole", "name": role}, "subjects": [subject]}),
        )
    }

    fn attrs<'a>(
        verb: &'a str,
        resource: &'a str,
        sub: &'a str,
        ns: &'a str,
        name: &'a str,
    ) -> Attributes<'a> {
        Attributes {
            verb,
            group: "",
            resource,
            subresource: sub,
            namespace: ns,
            name,
        }
    }

    #[test]
    fn bindings_roles_and_rules() {
        let agent = User::service_account("gitlab-agent", "agentk");
        let s = store_with(&[
            crb(
                "agent-view",
                "view",
                json!({"kind": "ServiceAccount", "name": "agentk", "namespace": "gitlab-agent"}),
            ),
            (
                "rbac.authorization.k8s.io/roles",
                json!({"metadata": {"name": "exec", "namespace": "shop"}, "rules": [{"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"], "resourceNames": ["cart-0"]}]}),
            ),
            (
                "rbac.authorization.k8s.io/rolebindings",
                json!({"metadata": {"name": "exec", "namespace": "shop"}, "roleRef": {"kind": "Role", "name": "exec"}, "subjects": [{"kind": "Group", "name": "system:serviceaccounts"}]}),
            ),
        ]);
        assert!(authorize(
            &s,
            &agent,
            &attrs("list", "pods", "", "default", "")
        ));
        assert!(!authorize(
            &s,
            &agent,
            &attrs("delete", "pods", "", "default", "web-0")
        ));
        assert!(!authorize(
            &s,
            &agent,
            &attrs("get", "secrets", "", "default", "x")
        ));
        assert!(authorize(
            &s,
            &agent,
            &attrs("create", "pods", "exec", "shop", "cart-0")
        ));
        assert!(!authorize(
            &s,
            &agent,
            &attrs("create", "pods", "exec", "shop", "other")
        ));
        assert!(!authorize(
            &s,
            &agent,
            &attrs("create", "pods", "exec", "default", "cart-0")
        ));
        assert!(authorize(
            &s,
            &User::admin(),
            &attrs("delete", "secrets", "", "x", "y")
        ));
        let denied = attrs("delete", "pods", "", "default", "web-0").forbidden(&agent);
        assert_eq!(
            denied,
            "pods \"web-0\" is forbidden: User \"system:serviceaccount:gitlab-agent:agentk\" cannot delete resource \"pods\" in API group \"\" in the namespace \"default\""
        );
    }

    #[test]
    fn impersonation_needs_each_permission() {
        let agent = User::service_account("gitlab-agent", "agentk");
        let rules = json!([
            {"apiGroups": [""], "resources": ["users", "groups"], "verbs": ["impersonate"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["userextras/agent.gitlab.com/id"], "verbs": ["impersonate"]},
        ]);
        let s = store_with(&[
            (
                "rbac.authorization.k8s.io/clusterroles",
                json!({"metadata": {"name": "imp"}, "rules": rules}),
            ),
            crb(
                "imp",
                "imp",
                json!({"kind": "ServiceAccount", "name": "agentk", "namespace": "gitlab-agent"}),
            ),
        ]);
        let mut r = Requested {
            user: Some("gitlab:ci_job:1".into()),
            groups: vec!["gitlab:ci_job".into()],
            ..Default::default()
        };
        r.extra
            .insert("agent.gitlab.com/id".into(), vec!["7".into()]);
        let u = impersonate(&s, &agent, &r).expect("allowed");
        assert_eq!(u.name, "gitlab:ci_job:1");
        assert_eq!(u.groups, ["gitlab:ci_job", "system:authenticated"]);
        r.extra
            .insert("agent.gitlab.com/username".into(), vec!["alice".into()]);
        let e = impersonate(&s, &agent, &r).expect_err("extra not allowed");
        assert!(e.contains("cannot impersonate resource \"userextras/agent.gitlab.com/username\" in API group \"authentication.k8s.io\""), "{e}");
        r.extra.clear();
        r.uid = Some("42".into());
        assert!(impersonate(&s, &agent, &r)
            .expect_err("uid")
            .contains("\"uids\""));
        let sa = Requested {
            user: Some("system:serviceaccount:kube-system:root".into()),
            ..Default::default()
        };
        assert!(impersonate(&s, &agent, &sa)
            .expect_err("service accounts are their own resource")
            .contains("\"serviceaccounts\""));
        let nobody = User::service_account("other", "x");
        assert!(impersonate(
            &s,
            &nobody,
            &Requested {
                user: Some("u".into()),
                ..Default::default()
            }
        )
        .is_err());
    }
}
