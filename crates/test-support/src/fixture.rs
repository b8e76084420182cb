//! An end-to-end environment: the test API server in process, and the real kas and
//! agentk binaries as child processes on free ports, driven through the real kasctl.

use crate::procs::{self, KasInfo, Proc};
use crate::TestApiServer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Waits until `f` returns `Some`, checking every 20 ms, for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A CI job started through kasctl.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: u64,
    pub token: String,
    pub kubeconfig: PathBuf,
}

/// The whole system on one machine.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub api: TestApiServer,
    pub kas: Proc,
    pub kas_info: KasInfo,
    pub agents: Vec<Proc>,
    pub cluster_kubeconfig: PathBuf,
    kas_args: Vec<String>,
    /// Environment variables kas runs with (again on restart).
    kas_envs: Vec<(String, String)>,
}

impl Env {
    /// Starts the test API server and kas (all listeners on free ports).
    pub async fn start() -> Env {
        Self::start_with(&[]).await
    }

    /// Like [`Env::start`], with extra kas arguments.
    pub async fn start_with(extra: &[&str]) -> Env {
        Self::start_wrapped(&[], extra).await
    }

    /// Like [`Env::start_with`], kas run through `wrapper` (e.g. `prlimit
    /// --nofile=256:256 --`).
    pub async fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Env {
        Self::start_custom(wrapper, extra, crate::apiserver::Options::default(), &[]).await
    }

    /// kas serving TLS on its agent listener with a certificate for `localhost` from a
    /// private CA; returns the environment and the CA's PEM file (for `--ca-cert`).
    pub async fn start_agent_tls() -> (Env, PathBuf) {
        let certs = tempfile::tempdir().expect("temp dir");
        let tls = crate::certs::LocalhostCert::generate();
        let p = |n: &str| certs.path().join(n);
        std::fs::write(p("agent.crt"), &tls.cert).expect("write");
        std::fs::write(p("agent.key"), &tls.key).expect("write");
        std::fs::write(
            p("kas.yaml"),
            format!(
                "agent:\n  tls:\n    certificate_file: {}\n    key_file: {}\n",
                p("agent.crt").display(),
                p("agent.key").display()
            ),
        )
        .expect("write");
        let env = Self::start_with(&["--config", p("kas.yaml").to_str().expect("path")]).await;
        let ca = env.path("agent-ca.pem");
        std::fs::write(&ca, &tls.ca).expect("write");
        (env, ca)
    }

    /// Like [`Env::start_with`], with a test API server that authorizes with RBAC.
    pub async fn start_rbac(extra: &[&str]) -> Env {
        let api = crate::apiserver::Options {
            rbac: true,
            tls: true,
            ..Default::default()
        };
        Self::start_custom(&[], extra, api, &[]).await
    }

    /// A test API server made with `api`, and kas with extra arguments and environment.
    pub async fn start_full(
        api: crate::apiserver::Options,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Env {
        Self::start_custom(&[], extra, api, envs).await
    }

    async fn start_custom(
        wrapper: &[&str],
        extra: &[&str],
        api: crate::apiserver::Options,
        envs: &[(&str, &str)],
    ) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let api = TestApiServer::start_with(api)
            .await
            .expect("test API server");
        let cluster_kubeconfig = dir.path().join("cluster.yaml");
        std::fs::write(&cluster_kubeconfig, api.kubeconfig()).expect("write kubeconfig");
        let mut kas_args: Vec<String> = procs::LOCAL_LISTENERS
            .iter()
            .map(|s| s.to_string())
            .collect();
        kas_args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(procs::bin("kas"));
                c
            }
            None => Command::new(procs::bin("kas")),
        };
        cmd.arg("--data-dir")
            .arg(dir.path().join("kas-data"))
            .args(&kas_args)
            .envs(envs.iter().copied());
        let kas_envs = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (kas, kas_info) = procs::start_kas_cmd(cmd, &dir.path().join("logs"));
        Env {
            dir,
            api,
            kas,
            kas_info,
            agents: Vec::new(),
            cluster_kubeconfig,
            kas_args,
            kas_envs,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Restarts kas on the same data dir and the same ports (agents reconnect).
    pub fn restart_kas(&mut self, kill: bool) {
        if kill {
            self.kas.kill();
        } else {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.kas.pid().to_string())
                .status();
            let _ = self.kas.child.wait();
        }
        let port = |url: &str| {
            url.rsplit(':')
                .next()
                .unwrap_or_default()
                .trim_end_matches('/')
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string()
        };
        let k8s_port = self
            .kas_info
            .k8s_proxy
            .split("//")
            .nth(1)
            .and_then(|h| h.split('/').next())
            .and_then(|h| h.rsplit(':').next())
            .unwrap_or_default()
            .to_string();
        let args = vec![
            "--listen-agent".to_string(),
            format!("127.0.0.1:{}", port(&self.kas_info.agent)),
            "--listen-api".to_string(),
            format!("127.0.0.1:{}", port(&self.kas_info.api)),
            "--listen-k8s-proxy".to_string(),
            format!("127.0.0.1:{k8s_port}"),
            "--listen-observability".to_string(),
            format!("127.0.0.1:{}", port(&self.kas_info.observability)),
        ];
        let mut all = args;
        // Keep non-listener arguments.
        let mut it = self.kas_args.iter();
        while let Some(a) = it.next() {
            if a.starts_with("--listen-") {
                it.next();
            } else {
                all.push(a.clone());
            }
        }
        let mut cmd = Command::new(procs::bin("kas"));
        cmd.arg("--data-dir")
            .arg(self.dir.path().join("kas-data"))
            .args(&all)
            .envs(self.kas_envs.iter().map(|(k, v)| (k, v)));
        let (kas, info) = procs::start_kas_cmd(cmd, &self.dir.path().join("logs"));
        self.kas = kas;
        self.kas_info = info;
    }

    pub fn kasctl(&self, args: &[&str]) -> String {
        procs::kasctl(&self.kas_info, args)
    }

    pub fn kasctl_json(&self, args: &[&str]) -> Value {
        procs::kasctl_json(&self.kas_info, args)
    }

    /// Registers an agent in `project` (created if missing) with `config`; returns its
    /// id and the path of its token file.
    pub fn create_agent(&self, project: &str, name: &str, config: &str) -> (u64, PathBuf) {
        procs::create_agent(&self.kas_info, self.dir.path(), project, name, config)
    }

    pub fn set_config(&self, project: &str, name: &str, config: &str) -> u64 {
        procs::set_agent_config(&self.kas_info, self.dir.path(), project, name, config)
    }

    /// Starts an agentk replica with `token_file`; returns its index in `agents`.
    pub fn start_agentk(&mut self, token_file: &Path, extra: &[&str]) -> usize {
        self.start_agentk_env(token_file, extra, &[])
    }

    /// Like [`Env::start_agentk`], with extra environment variables.
    pub fn start_agentk_env(
        &mut self,
        token_file: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> usize {
        let p = procs::start_agentk_env(
            &self.kas_info.agent,
            token_file,
            &self.cluster_kubeconfig,
            extra,
            envs,
            &self.dir.path().join("logs"),
        );
        self.agents.push(p);
        self.agents.len() - 1
    }

    /// The connected-agents entry of `agent_id`, if connected.
    pub fn connected(&self, agent_id: u64) -> Option<Value> {
        let out = procs::kasctl_raw(&self.kas_info, &["agents", "-o", "json"]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?
            .iter()
            .find(|a| a["id"].as_u64() == Some(agent_id))
            .cloned()
    }

    /// Waits until `agent_id` has `replicas` replicas, each with an idle tunnel.
    pub fn wait_connected(&self, agent_id: u64, replicas: usize) {
        wait_for(Duration::from_secs(20), "agent to connect", || {
            let a = self.connected(agent_id)?;
            let reps = a["replicas"].as_array()?;
            (reps.len() == replicas
                && reps
                    .iter()
                    .all(|r| r["idle_tunnels"].as_u64().unwrap_or(0) > 0))
            .then_some(())
        })
    }

    /// Starts a CI job through kasctl and writes its kubeconfig.
    pub fn start_job(&self, project: &str, environment: Option<&str>, user: &str) -> Job {
        procs::start_job(&self.kas_info, self.dir.path(), project, environment, user)
    }

    /// A kubectl command for a job's kubeconfig and context, with its own HOME.
    pub fn kubectl_cmd(&self, job: &Job, context: &str, args: &[&str]) -> Command {
        procs::kubectl(&self.path("home"), &job.kubeconfig, context, args)
    }

    /// Runs kubectl to completion.
    pub fn kubectl(&self, job: &Job, context: &str, args: &[&str]) -> Output {
        self.kubectl_cmd(job, context, args)
            .output()
            .expect("run kubectl")
    }

    /// kubectl as the cluster's administrator, straight to the test API server; panics
    /// with kubectl's error when it fails.
    pub fn admin_kubectl(&self, args: &[&str]) -> String {
        let kubeconfig = self.path("admin.yaml");
        if !kubeconfig.exists() {
            std::fs::write(&kubeconfig, self.api.admin_kubeconfig()).expect("kubeconfig");
        }
        let out = procs::kubectl(&self.path("home"), &kubeconfig, "test", args)
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The CA of the proxy, as kas generated it.
    pub fn proxy_ca(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("kas-data").join("k8s-proxy-ca.crt")).expect("CA file")
    }

    /// The proxy URL (ending in `/k8s-proxy`, no trailing slash).
    pub fn proxy_url(&self) -> String {
        self.kas_info.k8s_proxy.trim_end_matches('/').to_string()
    }

    /// All logs (kas and agents), for failure messages.
    pub fn logs(&self) -> String {
        let mut s = format!("--- kas ---\n{}", self.kas.logs());
        for (i, a) in self.agents.iter().enumerate() {
            s.push_str(&format!("\n--- agentk {i} ---\n{}", a.logs()));
        }
        s
    }
}
