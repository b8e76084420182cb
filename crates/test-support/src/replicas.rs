//! Several kas replicas on one real Redis and one real PostgreSQL (both started for
//! the test), with the test API server as the cluster and real agentk processes.

use crate::fixture::{wait_for, Job};
use crate::procs::{self, KasInfo, Proc};
use crate::services::{Postgres, Redis};
use crate::TestApiServer;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Redis entries expire after this long without refresh in these tests.
pub const EXPIRY: Duration = Duration::from_secs(3);

pub struct Replicas {
    pub dir: tempfile::TempDir,
    pub api: TestApiServer,
    pub redis: Redis,
    pub postgres: Postgres,
    /// `None` once killed.
    pub kas: Vec<Option<Proc>>,
    pub info: Vec<KasInfo>,
    pub agents: Vec<Proc>,
    pub cluster_kubeconfig: PathBuf,
    config_file: PathBuf,
}

impl Replicas {
    /// Starts Redis, PostgreSQL, the test API server and `n` kas replicas sharing a
    /// data dir (so they share the admin token and the proxy's generated CA).
    pub async fn start(n: usize) -> Replicas {
        Self::start_with(n, "").await
    }

    /// Like [`Replicas::start`], with `extra` YAML appended to kas's configuration.
    pub async fn start_with(n: usize, extra: &str) -> Replicas {
        Self::start_custom(n, "4s", extra).await
    }

    /// Like [`Replicas::start_with`], requests waiting up to `agent_wait` for an agent.
    pub async fn start_custom(n: usize, agent_wait: &str, extra: &str) -> Replicas {
        let dir = tempfile::tempdir().expect("temp dir");
        let api = TestApiServer::start().await.expect("test API server");
        let (redis, postgres) = tokio::task::spawn_blocking(|| (Redis::start(), Postgres::start()))
            .await
            .expect("services");
        let cluster_kubeconfig = dir.path().join("cluster.yaml");
        std::fs::write(&cluster_kubeconfig, api.kubeconfig()).expect("kubeconfig");
        let secret = dir.path().join("private-secret");
        std::fs::write(&secret, format!("{:064x}", rand::random::<u128>())).expect("secret");
        let config_file = dir.path().join("kas.yaml");
        std::fs::write(
            &config_file,
            format!(
                "redis:\n  url: {}\n  expiry: {}ms\nprivate:\n  secret_file: {}\ncontrolplane:\n  url: {}\nk8s_proxy:\n  agent_wait_timeout: {agent_wait}\n{extra}",
                redis.url(),
                EXPIRY.as_millis(),
                secret.display(),
                postgres.url()
            ),
        )
        .expect("config");
        let mut r = Replicas {
            dir,
            api,
            redis,
            postgres,
            kas: Vec::new(),
            info: Vec::new(),
            agents: Vec::new(),
            cluster_kubeconfig,
            config_file,
        };
        for _ in 0..n {
            r.start_kas();
        }
        r
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts one more kas replica; returns its index.
    pub fn start_kas(&mut self) -> usize {
        let mut args = vec!["--config", self.config_file.to_str().expect("path")];
        args.extend(procs::LOCAL_LISTENERS);
        args.extend(["--listen-private", "127.0.0.1:0"]);
        let (p, info) = procs::start_kas(&self.path("kas-data"), &args, &self.path("logs"));
        self.kas.push(Some(p));
        self.info.push(info);
        self.kas.len() - 1
    }

    /// SIGKILLs replica `i`.
    pub fn kill_kas(&mut self, i: usize) {
        if let Some(mut p) = self.kas[i].take() {
            p.kill();
        }
    }

    pub fn kasctl(&self, via: usize, args: &[&str]) -> String {
        procs::kasctl(&self.info[via], args)
    }

    pub fn kasctl_json(&self, via: usize, args: &[&str]) -> Value {
        procs::kasctl_json(&self.info[via], args)
    }

    /// Registers an agent (project created if missing) with `config`.
    pub fn create_agent(&self, project: &str, name: &str, config: &str) -> (u64, PathBuf) {
        procs::create_agent(&self.info[0], self.dir.path(), project, name, config)
    }

    /// Starts an agentk replica dialing the given kas replicas (in that order of
    /// preference is not guaranteed: agentk picks among them).
    pub fn start_agentk(&mut self, token_file: &Path, kas: &[usize]) -> usize {
        let addrs: Vec<&str> = kas.iter().map(|i| self.info[*i].agent.as_str()).collect();
        let extra: Vec<String> = addrs
            .iter()
            .skip(1)
            .flat_map(|a| ["--kas-address".to_string(), a.to_string()])
            .collect();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let p = procs::start_agentk(
            addrs[0],
            token_file,
            &self.cluster_kubeconfig,
            &extra,
            &self.path("logs"),
        );
        self.agents.push(p);
        self.agents.len() - 1
    }

    /// The agent's connections as kas replica `via` lists them: (kas instance, idle
    /// tunnels) per replica.
    pub fn connections(&self, via: usize, agent_id: u64) -> Vec<String> {
        let out = procs::kasctl_raw(&self.info[via], &["agents", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["id"].as_u64() == Some(agent_id))
            .flat_map(|a| a["replicas"].as_array().cloned().unwrap_or_default())
            .filter_map(|r| r["kas"].as_str().map(str::to_string))
            .collect()
    }

    /// Waits until replica `via` sees `n` connections of the agent.
    pub fn wait_connections(&self, via: usize, agent_id: u64, n: usize) -> Vec<String> {
        wait_for(Duration::from_secs(20), "agent connections", || {
            let c = self.connections(via, agent_id);
            (c.len() == n).then_some(c)
        })
    }

    /// Index of the replica with instance id `instance`.
    pub fn index_of(&self, instance: &str) -> usize {
        self.info
            .iter()
            .position(|i| i.instance == instance)
            .expect("known instance")
    }

    pub fn start_job(&self, project: &str, user: &str) -> Job {
        procs::start_job(&self.info[0], self.dir.path(), project, None, user)
    }

    /// kubectl for `job` entering through kas replica `via`.
    pub fn kubectl_cmd(&self, via: usize, job: &Job, context: &str, args: &[&str]) -> Command {
        let mut all = vec!["--server", self.info[via].k8s_proxy.as_str()];
        all.extend(args);
        procs::kubectl(&self.path("home"), &job.kubeconfig, context, &all)
    }

    pub fn kubectl(&self, via: usize, job: &Job, context: &str, args: &[&str]) -> Output {
        self.kubectl_cmd(via, job, context, args)
            .output()
            .expect("run kubectl")
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (i, k) in self.kas.iter().enumerate() {
            if let Some(k) = k {
                s.push_str(&format!("--- kas {i} ---\n{}\n", k.logs()));
            }
        }
        for (i, a) in self.agents.iter().enumerate() {
            s.push_str(&format!("--- agentk {i} ---\n{}\n", a.logs()));
        }
        s
    }
}
