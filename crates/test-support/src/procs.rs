//! Running the real binaries (kas, agentk, kasctl) in end-to-end tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Path of a workspace binary, next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>/<name>
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// A child process killed on drop; its stderr goes to a file kept for failures.
pub struct Proc {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// The process's stderr so far (its logs).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`...) to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {} failed", self.pid());
    }

    /// Sends SIGKILL and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Peak resident memory (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM:")
    }

    /// Current resident memory (VmRSS) in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }
}

/// A field of /proc/<pid>/status in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// What kas printed on start.
#[derive(Debug, Clone, Default)]
pub struct KasInfo {
    pub agent: String,
    pub api: String,
    pub k8s_proxy: String,
    pub observability: String,
    pub private: String,
    /// Instance id in the shared registry (several replicas only).
    pub instance: String,
    pub admin_token_file: PathBuf,
}

/// Every kas listener on a free loopback port.
pub const LOCAL_LISTENERS: [&str; 8] = [
    "--listen-agent",
    "127.0.0.1:0",
    "--listen-api",
    "127.0.0.1:0",
    "--listen-k8s-proxy",
    "127.0.0.1:0",
    "--listen-observability",
    "127.0.0.1:0",
];

/// kubectl for a job's kubeconfig and context, with its own HOME (no user config).
pub fn kubectl(home: &Path, kubeconfig: &Path, context: &str, args: &[&str]) -> Command {
    let _ = std::fs::create_dir_all(home);
    let mut c = Command::new("kubectl");
    c.env("HOME", home)
        .env("KUBECONFIG", kubeconfig)
        .arg("--context")
        .arg(context)
        .arg("--request-timeout=30s")
        .args(args)
        .stdin(Stdio::null());
    c
}

/// Starts kas with `args` and waits until it prints `kas: ready`.
pub fn start_kas(data_dir: &Path, args: &[&str], log_dir: &Path) -> (Proc, KasInfo) {
    let mut cmd = Command::new(bin("kas"));
    cmd.arg("--data-dir").arg(data_dir).args(args);
    start_kas_cmd(cmd, log_dir)
}

/// Starts kas as `cmd` prepares it and waits until it prints `kas: ready`.
pub fn start_kas_cmd(mut cmd: Command, log_dir: &Path) -> (Proc, KasInfo) {
    std::fs::create_dir_all(log_dir).expect("log dir");
    let stderr_path = log_dir.join(format!("kas-{}.log", rand::random::<u32>()));
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).expect("log file"))
        .spawn()
        .expect("start kas");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut info = KasInfo::default();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut w = line.split_whitespace().skip(1);
            match (w.next(), w.next(), w.next()) {
                (Some("listening"), Some(name), Some(url)) => match name {
                    "agent" => info.agent = url.to_string(),
                    "api" => info.api = url.to_string(),
                    "k8s_proxy" => info.k8s_proxy = url.to_string(),
                    "observability" => info.observability = url.to_string(),
                    "private" => info.private = url.to_string(),
                    _ => {}
                },
                (Some("admin"), Some("token"), Some("file")) => {
                    info.admin_token_file =
                        PathBuf::from(line.rsplit(' ').next().unwrap_or_default())
                }
                (Some("instance"), Some(id), _) => info.instance = id.to_string(),
                (Some("ready"), _, _) => {
                    let _ = tx.send(info.clone());
                }
                _ => {}
            }
        }
    });
    let proc_ = Proc { child, stderr_path };
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(info) => (proc_, info),
        Err(_) => panic!("kas did not start:\n{}", proc_.logs()),
    }
}

/// Starts agentk.
pub fn start_agentk(
    kas_agent_url: &str,
    token_file: &Path,
    kubeconfig: &Path,
    extra: &[&str],
    log_dir: &Path,
) -> Proc {
    start_agentk_env(kas_agent_url, token_file, kubeconfig, extra, &[], log_dir)
}

/// Starts agentk with extra environment variables.
pub fn start_agentk_env(
    kas_agent_url: &str,
    token_file: &Path,
    kubeconfig: &Path,
    extra: &[&str],
    envs: &[(&str, &str)],
    log_dir: &Path,
) -> Proc {
    std::fs::create_dir_all(log_dir).expect("log dir");
    let stderr_path = log_dir.join(format!("agentk-{}.log", rand::random::<u32>()));
    let child = Command::new(bin("agentk"))
        .arg("--kas-address")
        .arg(kas_agent_url)
        .arg("--token-file")
        .arg(token_file)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(extra)
        .env("RUST_LOG", "info")
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("log file"))
        .spawn()
        .expect("start agentk");
    Proc { child, stderr_path }
}

/// Runs kasctl against a kas; returns stdout, panicking with stderr on failure.
pub fn kasctl(kas: &KasInfo, args: &[&str]) -> String {
    let out = kasctl_raw(kas, args);
    assert!(
        out.status.success(),
        "kasctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs kasctl and returns its whole output.
pub fn kasctl_raw(kas: &KasInfo, args: &[&str]) -> std::process::Output {
    Command::new(bin("kasctl"))
        .arg("--server")
        .arg(&kas.api)
        .arg("--token-file")
        .arg(&kas.admin_token_file)
        .args(args)
        .output()
        .expect("run kasctl")
}

/// Runs kasctl with `-o json` and parses its output.
pub fn kasctl_json(kas: &KasInfo, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&kasctl(kas, &a)).expect("kasctl JSON")
}

/// Sets an agent's configuration from `config` (written to a file in `dir`); returns
/// the new version.
pub fn set_agent_config(kas: &KasInfo, dir: &Path, project: &str, name: &str, config: &str) -> u64 {
    let f = dir.join(format!("config-{}.yaml", rand::random::<u32>()));
    std::fs::write(&f, config).expect("write config");
    let args = [
        "agent",
        "config",
        "set",
        project,
        name,
        f.to_str().expect("path"),
    ];
    kasctl_json(kas, &args)["version"]
        .as_u64()
        .expect("version")
}

/// Registers an agent in `project` (created if missing) with `config`; returns its id
/// and the path of its token file (written in `dir`).
pub fn create_agent(
    kas: &KasInfo,
    dir: &Path,
    project: &str,
    name: &str,
    config: &str,
) -> (u64, PathBuf) {
    let _ = kasctl_raw(kas, &["project", "create", project]);
    let v = kasctl_json(kas, &["agent", "create", project, name]);
    let id = v["id"].as_u64().expect("agent id");
    let token_file = dir.join(format!("agent-{id}.token"));
    std::fs::write(&token_file, v["token"].as_str().expect("token")).expect("write token");
    set_agent_config(kas, dir, project, name, config);
    (id, token_file)
}

/// Starts a CI job through kasctl, its kubeconfig written in `dir`.
pub fn start_job(
    kas: &KasInfo,
    dir: &Path,
    project: &str,
    environment: Option<&str>,
    user: &str,
) -> crate::fixture::Job {
    let kubeconfig = dir.join(format!("job-{}.yaml", rand::random::<u32>()));
    let mut args = vec![
        "job",
        "start",
        project,
        "--user",
        user,
        "--kubeconfig",
        kubeconfig.to_str().expect("path"),
    ];
    if let Some(e) = environment {
        args.extend(["--environment", e]);
    }
    let v = kasctl_json(kas, &args);
    crate::fixture::Job {
        id: v["id"].as_u64().expect("job id"),
        token: v["token"].as_str().expect("token").to_string(),
        kubeconfig,
    }
}
