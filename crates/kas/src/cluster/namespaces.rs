//! Namespaces for CI jobs' environments (an agent's `managed_namespaces`): when a job
//! of project P starts in environment E, kas ensures, in each cluster the job may use,
//! the namespace `<project-path-slug>-<project-id>-<environment-slug>` and in it a
//! RoleBinding of the configured ClusterRole to the group
//! `gitlab:project_env:<project id>:<environment slug>` (which `access_as: ci_job`
//! impersonates). Idempotent: an existing namespace is kept, a binding to another role
//! is replaced.

use super::{CallError, Clusters};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The RoleBinding kas keeps in each namespace it manages.
const BINDING: &str = "gitlab-ci-environment";
/// A DNS label's length limit, which namespace names obey.
const MAX_NAME: usize = 63;

/// `path` as GitLab's `CI_PROJECT_PATH_SLUG`: lowercase, anything but `a-z0-9` as `-`.
fn slug(path: &str) -> String {
    path.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// The namespace of project `project_path` (id `project_id`) in the environment with
/// `environment_slug`: a valid DNS label, cut and suffixed with a hash of the whole
/// name when longer than 63 characters (so two long names stay apart).
pub fn namespace_name(project_path: &str, project_id: u64, environment_slug: &str) -> String {
    let full = format!(
        "{}-{project_id}-{}",
        slug(project_path),
        slug(environment_slug)
    );
    let full = full.trim_matches('-').to_string();
    if full.len() <= MAX_NAME {
        return full;
    }
    let hash = hex::encode(Sha256::digest(full.as_bytes()));
    let head = full[..MAX_NAME - 9].trim_end_matches('-');
    format!("{head}-{}", &hash[..8])
}

/// The group `access_as: ci_job` gives jobs of the project in the environment.
pub fn environment_group(project_id: u64, environment_slug: &str) -> String {
    format!("gitlab:project_env:{project_id}:{environment_slug}")
}

fn binding(namespace: &str, cluster_role: &str, group: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": BINDING,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "kas"},
        },
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
    })
}

/// Whether a stored binding already grants what `wanted` does.
fn same_grant(stored: &Value, wanted: &Value) -> bool {
    stored["roleRef"] == wanted["roleRef"] && stored["subjects"] == wanted["subjects"]
}

/// Ensures `namespace` and its binding of `cluster_role` to `group` in `agent`'s cluster.
pub async fn ensure(
    clusters: &Clusters,
    agent: u64,
    namespace: &str,
    cluster_role: &str,
    group: &str,
) -> Result<(), CallError> {
    let ns = json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": namespace, "labels": {"app.kubernetes.io/managed-by": "kas"}},
    });
    clusters.ensure(agent, "/api/v1/namespaces", &ns).await?;
    let collection =
        format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings");
    let path = format!("{collection}/{BINDING}");
    let wanted = binding(namespace, cluster_role, group);
    match clusters.get(agent, &path).await? {
        Some(stored) if same_grant(&stored, &wanted) => Ok(()),
        Some(_) => {
            // A RoleBinding's role cannot change in place.
            clusters.delete(agent, &path).await?;
            clusters.create(agent, &collection, &wanted).await
        }
        None => clusters.ensure(agent, &collection, &wanted).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_dns_label(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    }

    #[test]
    fn names_are_dns_labels_and_long_ones_keep_apart() {
        assert_eq!(
            namespace_name("acme/web/shop", 7, "production"),
            "acme-web-shop-7-production"
        );
        assert_eq!(
            namespace_name("Acme/Web.Shop", 7, "review-x1"),
            "acme-web-shop-7-review-x1"
        );
        let long = "acme/".repeat(20) + "shop";
        let a = namespace_name(&long, 7, "production");
        let b = namespace_name(&long, 8, "production");
        assert!(is_dns_label(&a), "{a}");
        assert_eq!(a.len(), 63);
        assert_ne!(a, b);
        assert_eq!(a, namespace_name(&long, 7, "production"), "stable");
        assert!(is_dns_label(&namespace_name("-x-/", 1, "e")));
    }

    #[test]
    fn a_binding_to_another_role_or_group_is_not_the_same_grant() {
        let want = binding("ns", "admin", "gitlab:project_env:7:production");
        assert!(same_grant(&want.clone(), &want));
        assert!(!same_grant(
            &binding("ns", "edit", "gitlab:project_env:7:production"),
            &want
        ));
        assert!(!same_grant(
            &binding("ns", "admin", "gitlab:project_env:8:production"),
            &want
        ));
    }
}
