//! Managed applications: Helm charts from kas's catalogue
//! (`deploy/managed-apps/catalogue.yaml`) installed, upgraded and uninstalled in an
//! agent's cluster by one-off pods `<operation>-<app>` in `gitlab-managed-apps`.
//!
//! An operation is recorded in the control plane first (one per application at a
//! time), then run in the background: kas ensures the namespace, the installer's
//! ServiceAccount and its ClusterRoleBinding, a ConfigMap with the values, and the pod
//! running Helm; it follows the pod's phase and records the outcome (`installed` with
//! the version, `errored` with a code, `uninstalled`). The pod's log is copied into the
//! integration log; the pod is deleted on success and kept on failure so its log can
//! be read (`kubectl logs install-<app> -n gitlab-managed-apps`).
//!
//! The kas running an operation holds a lease on it in the control plane; when that
//! kas stops (its lease released, or run out after a crash) any kas takes it over and
//! goes on following the pod.

use super::leased::{self, lease_until, Tasks};
use super::{CallError, Clusters};
use crate::http::application::IntegrationLog;
use kas_api::admin::CatalogueEntry;
use kas_api::error::{Error, Kind, Origin};
use kas_controlplane::{
    AppOperation, AppOutcome, AppState, ClusterApp, ControlPlane, StartAppOperation,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

/// Where install pods run and releases live.
pub const NAMESPACE: &str = "gitlab-managed-apps";
/// The installer pods' ServiceAccount.
const INSTALLER: &str = "kas-installer";
/// The image running Helm in install pods.
pub const HELM_IMAGE: &str = "alpine/helm:3.17.3";
/// How often a running pod's phase is read.
const POLL: Duration = Duration::from_millis(500);
/// An operation still running after this is recorded as errored (`timeout`).
const DEADLINE: Duration = Duration::from_secs(30 * 60);
/// The most of a pod's log copied into the integration log.
const LOG_LIMIT: usize = 1 << 20;

const CATALOGUE_YAML: &str = include_str!("../../../../deploy/managed-apps/catalogue.yaml");

/// The charts shipped inside kas (`bundled:<name>`), file by file.
const BUNDLED_AGENTK: [(&str, &str); 9] = [
    (
        "Chart.yaml",
        include_str!("../../../../deploy/helm/agentk/Chart.yaml"),
    ),
    (
        "values.yaml",
        include_str!("../../../../deploy/helm/agentk/values.yaml"),
    ),
    (
        "templates/NOTES.txt",
        include_str!("../../../../deploy/helm/agentk/templates/NOTES.txt"),
    ),
    (
        "templates/_helpers.tpl",
        include_str!("../../../../deploy/helm/agentk/templates/_helpers.tpl"),
    ),
    (
        "templates/clusterrolebinding.yaml",
        include_str!("../../../../deploy/helm/agentk/templates/clusterrolebinding.yaml"),
    ),
    (
        "templates/deployment.yaml",
        include_str!("../../../../deploy/helm/agentk/templates/deployment.yaml"),
    ),
    (
        "templates/impersonate.yaml",
        include_str!("../../../../deploy/helm/agentk/templates/impersonate.yaml"),
    ),
    (
        "templates/pdb.yaml",
        include_str!("../../../../deploy/helm/agentk/templates/pdb.yaml"),
    ),
    (
        "templates/secret.yaml",
        include_str!("../../../../deploy/helm/agentk/templates/secret.yaml"),
    ),
];
const BUNDLED_AGENTK_SA: (&str, &str) = (
    "templates/serviceaccount.yaml",
    include_str!("../../../../deploy/helm/agentk/templates/serviceaccount.yaml"),
);

/// One application of the catalogue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueApp {
    pub description: String,
    pub chart: String,
    pub version: String,
    #[serde(default)]
    pub values: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Catalogue {
    applications: BTreeMap<String, CatalogueApp>,
}

/// The catalogue shipped with kas (checked by a test, so it always parses).
pub fn catalogue() -> &'static BTreeMap<String, CatalogueApp> {
    static PARSED: OnceLock<BTreeMap<String, CatalogueApp>> = OnceLock::new();
    PARSED.get_or_init(|| {
        serde_yaml_ng::from_str::<Catalogue>(CATALOGUE_YAML)
            .map(|c| c.applications)
            .unwrap_or_default()
    })
}

/// The catalogue as the admin API shows it.
pub fn catalogue_entries() -> Vec<CatalogueEntry> {
    catalogue()
        .iter()
        .map(|(name, a)| CatalogueEntry {
            name: name.clone(),
            description: a.description.clone(),
            chart: a.chart.clone(),
            default_version: a.version.clone(),
        })
        .collect()
}

/// The files of a bundled chart, if `name` is one.
fn bundled(name: &str) -> Option<Vec<(&'static str, &'static str)>> {
    (name == "agentk").then(|| {
        let mut files = BUNDLED_AGENTK.to_vec();
        files.push(BUNDLED_AGENTK_SA);
        files
    })
}

/// What a caller asks for.
#[derive(Debug, Clone)]
pub struct AppRequest {
    pub agent_id: u64,
    pub app: String,
    pub operation: AppOperation,
    pub version: Option<String>,
    pub values: Option<String>,
}

fn bad_request(m: impl Into<String>) -> Error {
    Error::bad_request(m)
}

/// A chart version as Helm takes it.
fn check_version(v: &str) -> Result<(), Error> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(bad_request(format!(
            "version `{v}` is invalid: letters, digits, '.', '-', '+', '_' (at most 64)"
        )))
    }
}

/// Helm values: YAML whose top level is a mapping (or nothing).
fn check_values(v: &str) -> Result<(), Error> {
    match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(v) {
        Ok(serde_yaml_ng::Value::Mapping(_) | serde_yaml_ng::Value::Null) => Ok(()),
        Ok(_) => Err(bad_request("values must be a YAML mapping")),
        Err(e) => Err(bad_request(format!("values are not valid YAML: {e}"))),
    }
}

/// Starts and follows operations; see the module docs.
pub struct Apps {
    cp: Arc<dyn ControlPlane>,
    clusters: Clusters,
    log: IntegrationLog,
    /// This kas, as a lease owner.
    owner: String,
    /// Operations this kas follows, by agent and application.
    running: Tasks<(u64, String)>,
}

impl Apps {
    pub fn new(cp: Arc<dyn ControlPlane>, clusters: Clusters, log: IntegrationLog) -> Arc<Self> {
        Arc::new(Apps {
            cp,
            clusters,
            log,
            owner: leased::new_owner(),
            running: Tasks::new(),
        })
    }

    /// Records the operation and starts it in the background; returns at once.
    pub async fn start(self: &Arc<Self>, req: AppRequest) -> Result<ClusterApp, Error> {
        let entry = catalogue().get(&req.app).ok_or_else(|| {
            let known: Vec<&str> = catalogue().keys().map(String::as_str).collect();
            Error::not_found(format!(
                "no application `{}` in the catalogue (it has: {})",
                req.app,
                known.join(", ")
            ))
        })?;
        let current = self
            .cp
            .list_apps(Some(req.agent_id))
            .await?
            .into_iter()
            .find(|a| a.name == req.app);
        let (version, values) = match req.operation {
            // Uninstalling keeps what was installed.
            AppOperation::Uninstall => {
                if req.version.is_some() || req.values.is_some() {
                    return Err(bad_request("uninstall takes no version or values"));
                }
                let c = current.as_ref();
                (
                    c.and_then(|c| c.version.clone()),
                    c.map(|c| c.values_yaml.clone()).unwrap_or_default(),
                )
            }
            AppOperation::Install | AppOperation::Upgrade => {
                let version = req.version.clone().unwrap_or_else(|| entry.version.clone());
                check_version(&version)?;
                let values = req.values.clone().unwrap_or_default();
                check_values(&values)?;
                (Some(version), values)
            }
        };
        let app = self
            .cp
            .begin_app_operation(&StartAppOperation {
                agent_id: req.agent_id,
                name: req.app.clone(),
                operation: req.operation,
                version,
                values_yaml: values,
                owner: self.owner.clone(),
                lease_until: lease_until(),
            })
            .await?;
        self.spawn(app.clone(), true);
        Ok(app)
    }

    fn spawn(self: &Arc<Self>, app: ClusterApp, fresh: bool) {
        let key = (app.agent_id, app.name.clone());
        let me = self.clone();
        self.running
            .spawn(key, async move { me.run(app, fresh).await });
    }

    /// Takes over, now and then, operations whose kas stopped. Runs until dropped.
    pub fn resume_in_background(self: &Arc<Self>) -> AbortOnDropHandle<()> {
        leased::claim_periodically(self, |me: Arc<Self>| async move {
            match me.cp.claim_app_operations(&me.owner, lease_until()).await {
                Ok(claimed) => {
                    for app in claimed {
                        tracing::info!(agent_id = app.agent_id, app = %app.name, operation = app.operation.as_str(), "taking over a managed application operation");
                        me.spawn(app, false);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim managed application operations")
                }
            }
        })
    }

    /// Stops following (on shutdown) and releases the leases, so that the next kas
    /// takes the operations over at once.
    pub async fn release(&self) {
        for (agent, name) in self.running.take_all() {
            if let Err(e) = self.cp.renew_app_lease(agent, &name, &self.owner, 0).await {
                tracing::warn!(error = %e, app = %name, "cannot release a managed application operation");
            }
        }
    }

    async fn run(&self, app: ClusterApp, fresh: bool) {
        let outcome = match self.operate(&app, fresh).await {
            Ok(Some(outcome)) => outcome,
            // Another kas runs it now.
            Ok(None) => return,
            Err(e) => AppOutcome {
                state: AppState::Errored,
                version: app.version.clone(),
                error_code: Some(e.code),
            },
        };
        tracing::info!(
            agent_id = app.agent_id, app = %app.name, operation = app.operation.as_str(),
            state = outcome.state.as_str(), error_code = outcome.error_code.as_deref(),
            "managed application operation ended"
        );
        if let Err(e) = self
            .cp
            .finish_app_operation(app.agent_id, &app.name, &outcome)
            .await
        {
            tracing::error!(error = %e, app = %app.name, "cannot record a managed application's state");
        }
    }

    /// Prepares and starts the pod (unless it runs already), follows it to its end
    /// and cleans up. `None` when the lease was lost.
    async fn operate(
        &self,
        app: &ClusterApp,
        fresh: bool,
    ) -> Result<Option<AppOutcome>, CallError> {
        let agent = app.agent_id;
        let pod_path = format!("/api/v1/namespaces/{NAMESPACE}/pods/{}", app.pod);
        let existing = self.clusters.get(agent, &pod_path).await?;
        if fresh || existing.is_none() {
            self.prepare(app).await?;
            if existing.is_some() {
                // The pod of an earlier operation, kept because it failed.
                self.delete_and_wait(agent, &pod_path).await?;
            }
            let pods = format!("/api/v1/namespaces/{NAMESPACE}/pods");
            self.clusters.create(agent, &pods, &pod(app)?).await?;
        }
        let Some(ended) = self.follow(app, &pod_path).await? else {
            return Ok(None);
        };
        self.copy_log(app).await;
        let outcome = match ended {
            Ok(()) => {
                self.clusters.delete(agent, &pod_path).await?;
                if app.operation == AppOperation::Uninstall {
                    let values = format!(
                        "/api/v1/namespaces/{NAMESPACE}/configmaps/values-{}",
                        app.name
                    );
                    self.clusters.delete(agent, &values).await?;
                }
                AppOutcome {
                    state: match app.operation {
                        AppOperation::Uninstall => AppState::Uninstalled,
                        _ => AppState::Installed,
                    },
                    version: app.version.clone(),
                    error_code: None,
                }
            }
            Err(code) => AppOutcome {
                state: AppState::Errored,
                version: app.version.clone(),
                error_code: Some(code),
            },
        };
        Ok(Some(outcome))
    }

    /// The namespace, the installer's account and rights, the values (and a bundled
    /// chart).
    async fn prepare(&self, app: &ClusterApp) -> Result<(), CallError> {
        let agent = app.agent_id;
        let c = &self.clusters;
        let managed = json!({"app.kubernetes.io/managed-by": "kas"});
        c.ensure(
            agent,
            "/api/v1/namespaces",
            &json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": NAMESPACE, "labels": managed},
            }),
        )
        .await?;
        c.ensure(
            agent,
            &format!("/api/v1/namespaces/{NAMESPACE}/serviceaccounts"),
            &json!({
                "apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": INSTALLER, "namespace": NAMESPACE, "labels": managed},
            }),
        )
        .await?;
        // Charts install cluster-wide objects (CRDs, cluster roles): Helm needs it all.
        c.ensure(agent, "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", &json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": format!("{NAMESPACE}-{INSTALLER}"), "labels": managed},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": INSTALLER, "namespace": NAMESPACE}],
        }))
        .await?;
        let entry = catalogue().get(&app.name).ok_or_else(|| CallError {
            code: "not_in_catalogue".into(),
        })?;
        let mut data = BTreeMap::from([
            ("defaults.yaml".to_string(), entry.values.clone()),
            ("values.yaml".to_string(), app.values_yaml.clone()),
        ]);
        if let Some(files) = entry.chart.strip_prefix("bundled:").and_then(bundled) {
            for (path, text) in files {
                data.insert(chart_key(path), text.to_string());
            }
        }
        let configmaps = format!("/api/v1/namespaces/{NAMESPACE}/configmaps");
        let name = format!("values-{}", app.name);
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": managed},
            "data": data,
        });
        match c.create(agent, &configmaps, &cm).await {
            Err(e) if e.code == "cluster_status_409" => {
                c.replace(agent, &format!("{configmaps}/{name}"), &cm).await
            }
            other => other,
        }
    }

    async fn delete_and_wait(&self, agent: u64, path: &str) -> Result<(), CallError> {
        self.clusters.delete(agent, path).await?;
        // A pod takes its grace period to go; its name is taken until then.
        let until = tokio::time::Instant::now() + Duration::from_secs(120);
        while self.clusters.get(agent, path).await?.is_some() {
            if tokio::time::Instant::now() > until {
                return Err(CallError {
                    code: "old_pod_not_deleted".into(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    /// Follows the pod until it ends: `Ok(())` when it succeeded, `Err(code)` when it
    /// failed or went away; `None` when this kas lost the lease.
    async fn follow(
        &self,
        app: &ClusterApp,
        pod_path: &str,
    ) -> Result<Option<Result<(), String>>, CallError> {
        let started = tokio::time::Instant::now();
        loop {
            let renewed = self
                .cp
                .renew_app_lease(app.agent_id, &app.name, &self.owner, lease_until())
                .await;
            if matches!(renewed, Ok(false)) {
                return Ok(None);
            }
            match self.clusters.get(app.agent_id, pod_path).await {
                Ok(None) => return Ok(Some(Err("pod_lost".into()))),
                Ok(Some(pod)) => match pod["status"]["phase"].as_str() {
                    Some("Succeeded") => return Ok(Some(Ok(()))),
                    Some("Failed") => return Ok(Some(Err(failure_code(&pod)))),
                    _ => {}
                },
                // The agent may be reconnecting: keep following within the deadline.
                Err(e) => {
                    tracing::info!(app = %app.name, error = %e, "cannot read an install pod; retrying")
                }
            }
            if started.elapsed() > DEADLINE {
                return Ok(Some(Err("timeout".into())));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn copy_log(&self, app: &ClusterApp) {
        let path = format!(
            "/api/v1/namespaces/{NAMESPACE}/pods/{}/log?container=helm&limitBytes={LOG_LIMIT}",
            app.pod
        );
        match self.clusters.text(app.agent_id, &path).await {
            Ok(text) => self.log.pod_log(app.agent_id, &app.pod, &text),
            Err(e) => {
                tracing::warn!(app = %app.name, error = %e, "cannot read an install pod's log")
            }
        }
    }
}

/// A ConfigMap key for a chart file (keys cannot hold `/`).
fn chart_key(path: &str) -> String {
    format!("chart.{}", path.replace('/', "."))
}

/// Why a failed pod failed: Helm's exit code when the container says it.
fn failure_code(pod: &Value) -> String {
    pod["status"]["containerStatuses"]
        .as_array()
        .and_then(|s| s.first())
        .and_then(|s| s["state"]["terminated"]["exitCode"].as_i64())
        .map(|c| format!("helm_exit_{c}"))
        .unwrap_or_else(|| "pod_failed".into())
}

/// The pod running Helm for `app`'s operation.
fn pod(app: &ClusterApp) -> Result<Value, CallError> {
    let entry = catalogue().get(&app.name).ok_or_else(|| CallError {
        code: "not_in_catalogue".into(),
    })?;
    let release = app.name.as_str();
    let mut volumes =
        vec![json!({"name": "values", "configMap": {"name": format!("values-{release}")}})];
    let mut mounts = vec![json!({"name": "values", "mountPath": "/kas/values", "readOnly": true})];
    let (chart, repo): (String, Option<&str>) = match entry.chart.strip_prefix("bundled:") {
        Some(name) => {
            let items: Vec<Value> = bundled(name)
                .unwrap_or_default()
                .iter()
                .map(|(path, _)| json!({"key": chart_key(path), "path": path}))
                .collect();
            volumes.push(json!({"name": "chart", "configMap": {"name": format!("values-{release}"), "items": items}}));
            mounts.push(json!({"name": "chart", "mountPath": "/kas/chart", "readOnly": true}));
            ("/kas/chart".into(), None)
        }
        None => match entry.chart.split_once(' ') {
            Some((repo, name)) => (name.to_string(), Some(repo)),
            None => (entry.chart.clone(), None),
        },
    };
    let mut args: Vec<String> = match app.operation {
        AppOperation::Uninstall => vec!["uninstall".into(), release.into(), "--wait".into()],
        AppOperation::Install | AppOperation::Upgrade => {
            let mut a = vec!["upgrade".into(), "--install".into(), release.into(), chart];
            if let Some(repo) = repo {
                a.extend(["--repo".into(), repo.into()]);
            }
            if let (Some(v), None) = (&app.version, entry.chart.strip_prefix("bundled:")) {
                a.extend(["--version".into(), v.clone()]);
            }
            a.extend(
                [
                    "--values",
                    "/kas/values/defaults.yaml",
                    "--values",
                    "/kas/values/values.yaml",
                ]
                .map(String::from),
            );
            a.extend(["--wait".into(), "--timeout".into(), "15m".into()]);
            a
        }
    };
    args.extend(["--namespace".into(), NAMESPACE.into()]);
    Ok(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": app.pod, "namespace": NAMESPACE,
            "labels": {
                "app.kubernetes.io/managed-by": "kas",
                "kas.dev/app": release,
                "kas.dev/operation": app.operation.as_str(),
            },
        },
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": INSTALLER,
            "containers": [{
                "name": "helm", "image": HELM_IMAGE, "command": ["helm"], "args": args,
                "env": [{"name": "HELM_CACHE_HOME", "value": "/tmp/helm"}, {"name": "HELM_CONFIG_HOME", "value": "/tmp/helm"}],
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    }))
}

impl From<kas_controlplane::Error> for CallError {
    fn from(e: kas_controlplane::Error) -> Self {
        tracing::error!(error = %e, "control plane error in a managed application operation");
        CallError {
            code: "control_plane".into(),
        }
    }
}

/// How the admin API reports a refused operation.
pub fn conflict(m: impl Into<String>) -> Error {
    Error::new(Kind::Conflict, Origin::Client, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_parses_and_names_versions() {
        let parsed: Catalogue = serde_yaml_ng::from_str(CATALOGUE_YAML).expect("catalogue");
        assert!(parsed.applications.len() >= 4);
        for (name, app) in &parsed.applications {
            check_version(&app.version).expect(name);
            check_values(&app.values).expect(name);
        }
        assert_eq!(catalogue().len(), parsed.applications.len());
    }

    #[test]
    fn the_bundled_agentk_chart_has_every_file_of_the_chart() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/helm/agentk");
        let mut on_disk = Vec::new();
        let mut dirs = vec![std::path::PathBuf::from(root)];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).expect("chart dir").flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if let Ok(rel) = p.strip_prefix(root) {
                    on_disk.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        on_disk.sort();
        let mut bundled: Vec<String> = bundled("agentk")
            .expect("bundled")
            .iter()
            .map(|(p, _)| p.to_string())
            .collect();
        bundled.sort();
        assert_eq!(bundled, on_disk);
    }

    #[test]
    fn install_pods_run_helm_with_the_catalogue_chart_and_both_values() {
        let app = ClusterApp {
            agent_id: 1,
            name: "ingress-nginx".into(),
            state: AppState::Installing,
            operation: AppOperation::Install,
            version: Some("4.12.1".into()),
            error_code: None,
            pod: "install-ingress-nginx".into(),
            updated_at: 0,
            values_yaml: String::new(),
        };
        let p = pod(&app).expect("pod");
        assert_eq!(p["metadata"]["name"], "install-ingress-nginx");
        let args: Vec<&str> = p["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            &args[..4],
            ["upgrade", "--install", "ingress-nginx", "ingress-nginx"]
        );
        assert!(args.windows(2).any(|w| w == ["--version", "4.12.1"]));
        assert!(args
            .windows(2)
            .any(|w| w == ["--repo", "https://kubernetes.github.io/ingress-nginx"]));
        assert!(args
            .windows(2)
            .any(|w| w == ["--values", "/kas/values/values.yaml"]));
        assert!(args.windows(2).any(|w| w == ["--namespace", NAMESPACE]));
        let failed = json!({"status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 1}}}]}});
        assert_eq!(failure_code(&failed), "helm_exit_1");
        assert_eq!(
            failure_code(&json!({"status": {"phase": "Failed"}})),
            "pod_failed"
        );
    }
}
