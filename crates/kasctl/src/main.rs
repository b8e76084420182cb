//! kasctl: the admin and CI helper CLI of kas. It talks to kas's admin API (on the API
//! listener) with the admin token; it holds no state of its own.

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, Parser)]
#[command(
    name = "kasctl",
    version,
    about = "Administer kas: groups, projects, agents, environments, CI jobs"
)]
struct Cli {
    /// kas API listener URL.
    #[arg(
        long,
        env = "KASCTL_SERVER",
        default_value = "http://127.0.0.1:8153",
        global = true
    )]
    server: String,
    /// File holding the kas admin token.
    #[arg(
        long,
        env = "KASCTL_TOKEN_FILE",
        default_value = "./kas-data/admin-token",
        global = true
    )]
    token_file: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Groups (nested paths like acme/platform).
    #[command(subcommand)]
    Group(PathCmd),
    /// Projects (inside groups, like acme/web/shop).
    #[command(subcommand)]
    Project(PathCmd),
    /// Agents registered in a configuration project.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Connected agents: id, name, configuration project, replicas, versions, since.
    Agents {
        /// One row per agent replica: its pod, namespace, node, versions and kas.
        #[arg(long)]
        replicas: bool,
    },
    /// Environments of a project.
    #[command(subcommand)]
    Environment(EnvCmd),
    /// CI jobs: start (get a kubeconfig), finish, list.
    #[command(subcommand)]
    Job(JobCmd),
    /// The audit trail: requests through the Kubernetes API proxy and admin actions
    /// (newest last).
    Audit {
        /// Only `request` records (proxy requests) or only `admin` records.
        #[arg(long, value_parser = ["request", "admin"])]
        kind: Option<String>,
        #[arg(long)]
        job: Option<u64>,
        #[arg(long)]
        project: Option<String>,
        /// Agent id.
        #[arg(long)]
        agent: Option<u64>,
        /// Only records since: a duration ago (30s, 15m, 2h, 7d) or unix seconds.
        #[arg(long)]
        since: Option<String>,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Access questions: may jobs of a project use an agent, and as whom?
    #[command(subcommand)]
    Access(AccessCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g.
    /// `source <(kasctl completion bash)`.
    Completion { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
enum AccessCmd {
    /// Whether jobs of a project (and environment) may use an agent, which ci_access
    /// entry decides, and the exact identity the cluster would see.
    Explain {
        #[arg(long)]
        project: String,
        #[arg(long)]
        environment: Option<String>,
        /// Agent id, or `<configuration project>:<name>` (the kubeconfig context).
        #[arg(long)]
        agent: String,
        /// The job's user (it appears in a ci_job identity).
        #[arg(long, default_value = "user")]
        user: String,
        #[arg(long, default_value_t = 1)]
        job_id: u64,
        #[arg(long, default_value_t = 1)]
        pipeline_id: u64,
        /// As for a job on a protected branch or tag.
        #[arg(long)]
        protected: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PathCmd {
    /// Create it, and any missing parent groups (like mkdir -p).
    Create {
        path: String,
        /// Use this numeric id (to mirror ids from elsewhere).
        #[arg(long)]
        id: Option<u64>,
    },
    /// List all.
    List,
}

#[derive(Debug, Subcommand)]
enum AgentCmd {
    /// Register an agent; its token is shown once.
    Create {
        /// Configuration project path.
        project: String,
        name: String,
        /// Also write the agent token to this file (mode 0600).
        #[arg(long = "write-token", value_name = "FILE")]
        write_token: Option<PathBuf>,
    },
    /// List registered agents.
    List,
    /// The agent's config.yaml.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Delete an agent and its tokens; its connections close at once on every kas.
    Delete {
        /// Configuration project path.
        project: String,
        name: String,
    },
    /// The agent's tokens: at most two active at once, so one can be rotated.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a token (shown once); fails while two tokens are active.
    Create {
        /// Configuration project path.
        project: String,
        agent: String,
        /// The token's name (default: token-<n>).
        #[arg(long = "name")]
        token_name: Option<String>,
        /// Also write the token to this file (mode 0600).
        #[arg(long = "write-token", value_name = "FILE")]
        write_token: Option<PathBuf>,
    },
    /// List the agent's tokens: name, created, last used, revoked (never the secret).
    List { project: String, agent: String },
    /// Revoke a token (by name or id); connections made with it close at once.
    Revoke {
        project: String,
        agent: String,
        /// The token's name or id.
        token: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Validate and store config.yaml (use - for standard input).
    Set {
        project: String,
        name: String,
        file: PathBuf,
    },
    /// Print the stored config.yaml.
    Get { project: String, name: String },
}

#[derive(Debug, Subcommand)]
enum EnvCmd {
    /// Create an environment of a project.
    Create {
        project: String,
        name: String,
        /// production, staging, testing, development or other (guessed from the name if absent).
        #[arg(long)]
        tier: Option<String>,
    },
    /// List environments.
    List {
        #[arg(long)]
        project: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum JobCmd {
    /// Start a CI job; prints its id and token and writes its kubeconfig.
    Start(StartArgs),
    /// Finish a job; its token stops working at once.
    Finish {
        id: u64,
        #[arg(long, default_value = "success")]
        status: String,
    },
    /// List jobs.
    List,
}

#[derive(Debug, Args)]
struct StartArgs {
    project: String,
    #[arg(long)]
    environment: Option<String>,
    /// The user the job runs for.
    #[arg(long)]
    user: String,
    /// Pipeline id (a new one is allocated if absent).
    #[arg(long)]
    pipeline: Option<u64>,
    /// The job runs for a protected branch or tag (for `protected_branches_only`).
    #[arg(long)]
    protected: bool,
    /// Write the job's kubeconfig here (mode 0600).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
}

struct Api {
    base: String,
    token: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Api {
    async fn call(&self, method: http::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let uri = format!("{}/api/v1{path}", self.base.trim_end_matches('/'));
        let data = body.map(|b| b.to_string()).unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(&uri)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(data)))
            .with_context(|| format!("invalid server URL `{}`", self.base))?;
        let resp = self.client.request(req).await.with_context(|| {
            format!(
                "cannot reach kas at {} (is it running? set --server or KASCTL_SERVER)",
                self.base
            )
        })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading kas's answer")?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&bytes) }));
        if !status.is_success() {
            let msg = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed")
                .to_string();
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(v)
    }
}

fn write_private(path: &Path, data: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data.as_bytes())?;
    Ok(())
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:w$}", c, w = widths[i]))
            .collect();
        println!("{}", s.join("   ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn since(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(secs);
    let d = now.saturating_sub(secs);
    match d {
        0..=119 => format!("{d}s"),
        120..=7199 => format!("{}m", d / 60),
        _ => format!("{}h", d / 3600),
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("kasctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    // Needs no server and no token.
    if let Cmd::Completion { shell } = cli.cmd {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "kasctl", &mut script);
        // A closed pipe (`| head`) is not an error worth a message.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
        return Ok(());
    }
    let token = std::fs::read_to_string(&cli.token_file)
        .with_context(|| {
            format!(
                "cannot read the admin token file {} (set --token-file or KASCTL_TOKEN_FILE)",
                cli.token_file.display()
            )
        })?
        .trim()
        .to_string();
    let api = Api {
        base: cli.server.clone(),
        token,
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    let json_out = cli.output == Output::Json;
    let print_json =
        |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    use http::Method as M;
    match cli.cmd {
        // Handled above, before the token is read.
        Cmd::Completion { .. } => {}
        Cmd::Audit {
            kind,
            job,
            project,
            agent,
            since: since_arg,
            limit,
        } => {
            let mut q = vec![format!("limit={limit}")];
            if let Some(k) = kind {
                q.push(format!("kind={k}"));
            }
            if let Some(j) = job {
                q.push(format!("job={j}"));
            }
            if let Some(p) = project {
                q.push(format!("project={}", encode(&p)));
            }
            if let Some(a) = agent {
                q.push(format!("agent={a}"));
            }
            if let Some(s) = since_arg {
                q.push(format!("since={}", parse_since(&s)?));
            }
            let v = api
                .call(M::GET, &format!("/audit?{}", q.join("&")), None)
                .await?;
            if json_out {
                print_json(&v)
            } else {
                table(
                    &[
                        "TIME", "KIND", "WHO", "JOB", "PROJECT", "ENV", "AGENT", "AS", "IDENTITY",
                        "ACTION", "TARGET", "CODE", "BYTES", "MS",
                    ],
                    list(&v).iter().map(audit_row).collect(),
                )
            }
        }
        Cmd::Access(AccessCmd::Explain {
            project,
            environment,
            agent,
            user,
            job_id,
            pipeline_id,
            protected,
        }) => {
            let mut q = vec![
                ("protected", protected.to_string()),
                ("project", project),
                ("agent", agent),
                ("user", user),
                ("job_id", job_id.to_string()),
                ("pipeline_id", pipeline_id.to_string()),
            ];
            if let Some(e) = environment {
                q.push(("environment", e));
            }
            let query = q
                .iter()
                .map(|(k, v)| format!("{k}={}", encode(v)))
                .collect::<Vec<_>>()
                .join("&");
            let v = api
                .call(M::GET, &format!("/access/explain?{query}"), None)
                .await?;
            if json_out {
                print_json(&v)
            } else {
                print!("{}", explain_text(&v));
            }
        }
        Cmd::Group(PathCmd::Create { path, id }) => {
            let v = api
                .call(M::POST, "/groups", Some(json!({ "path": path, "id": id })))
                .await?;
            if json_out {
                print_json(&v)
            } else {
                println!("group {} (id {})", s(&v, "path"), s(&v, "id"))
            }
        }
        Cmd::Project(PathCmd::Create { path, id }) => {
            let v = api
                .call(
                    M::POST,
                    "/projects",
                    Some(json!({ "path": path, "id": id })),
                )
                .await?;
            if json_out {
                print_json(&v)
            } else {
                println!("project {} (id {})", s(&v, "path"), s(&v, "id"))
            }
        }
        Cmd::Group(PathCmd::List) | Cmd::Project(PathCmd::List) => {
            list_paths(&api, &cli.cmd, json_out).await?
        }
        Cmd::Agent(AgentCmd::Create {
            project,
            name,
            write_token,
        }) => {
            let v = api
                .call(
                    M::POST,
                    "/agents",
                    Some(json!({ "project": project, "name": name })),
                )
                .await?;
            let token = s(&v, "token");
            if let Some(f) = &write_token {
                write_private(f, &format!("{token}\n"))?;
            }
            if json_out {
                print_json(
                    &json!({ "id": v["id"], "name": v["name"], "project": v["project_path"], "token": token }),
                );
            } else {
                println!(
                    "agent {} (id {}) registered in {}",
                    s(&v, "name"),
                    s(&v, "id"),
                    s(&v, "project_path")
                );
                match &write_token {
                    Some(f) => println!("token written to {} (it is not shown again)", f.display()),
                    None => println!("token (shown once; store it now): {token}"),
                }
            }
        }
        Cmd::Agent(AgentCmd::Delete { project, name }) => {
            let q = format!("/agents?project={}&name={}", enc(&project), enc(&name));
            let v = api.call(M::DELETE, &q, None).await?;
            if json_out {
                print_json(&v)
            } else {
                println!(
                    "agent {} (id {}) deleted from {}; its tokens no longer work",
                    s(&v, "name"),
                    s(&v, "id"),
                    s(&v, "project_path")
                );
            }
        }
        Cmd::Agent(AgentCmd::Token(t)) => token_cmd(&api, t, json_out).await?,
        Cmd::Agent(AgentCmd::List) => {
            let v = api.call(M::GET, "/agents", None).await?;
            if json_out {
                print_json(&v)
            } else {
                table(
                    &["ID", "NAME", "CONFIG PROJECT", "CONFIG VERSION"],
                    list(&v)
                        .iter()
                        .map(|a| {
                            vec![
                                s(a, "id"),
                                s(a, "name"),
                                s(a, "project_path"),
                                s(a, "config_version"),
                            ]
                        })
                        .collect(),
                )
            }
        }
        Cmd::Agent(AgentCmd::Config(ConfigCmd::Set {
            project,
            name,
            file,
        })) => {
            let yaml = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let v = api
                .call(
                    M::PUT,
                    "/agents/config",
                    Some(json!({ "project": project, "name": name, "config": yaml })),
                )
                .await?;
            if json_out {
                print_json(&v)
            } else {
                for w in list(&v["warnings"]) {
                    eprintln!("warning: {}", w.as_str().unwrap_or_default());
                }
                println!(
                    "configuration of {project}:{name} stored as version {}",
                    s(&v, "version")
                );
            }
        }
        Cmd::Agent(AgentCmd::Config(ConfigCmd::Get { project, name })) => {
            let q = format!(
                "/agents/config?project={}&name={}",
                enc(&project),
                enc(&name)
            );
            let v = api.call(M::GET, &q, None).await?;
            if json_out {
                print_json(&v)
            } else {
                print!("{}", s(&v, "config"))
            }
        }
        Cmd::Agents { replicas } => {
            let v = api.call(M::GET, "/connected-agents", None).await?;
            if json_out {
                print_json(&v)
            } else if replicas {
                replica_table(&v)
            } else {
                agents_table(&v)
            }
        }
        Cmd::Environment(EnvCmd::Create {
            project,
            name,
            tier,
        }) => {
            let v = api
                .call(
                    M::POST,
                    "/environments",
                    Some(json!({ "project": project, "name": name, "tier": tier })),
                )
                .await?;
            if json_out {
                print_json(&v)
            } else {
                println!(
                    "environment {} of {} (slug {}, tier {})",
                    s(&v, "name"),
                    s(&v, "project_path"),
                    s(&v, "slug"),
                    s(&v, "tier")
                )
            }
        }
        Cmd::Environment(EnvCmd::List { project }) => {
            let q = match &project {
                Some(p) => format!("/environments?project={}", enc(p)),
                None => "/environments".into(),
            };
            let v = api.call(M::GET, &q, None).await?;
            if json_out {
                print_json(&v)
            } else {
                table(
                    &["ID", "PROJECT", "NAME", "SLUG", "TIER"],
                    list(&v)
                        .iter()
                        .map(|e| {
                            vec![
                                s(e, "id"),
                                s(e, "project_path"),
                                s(e, "name"),
                                s(e, "slug"),
                                s(e, "tier"),
                            ]
                        })
                        .collect(),
                )
            }
        }
        Cmd::Job(JobCmd::Start(a)) => {
            let v = api
                .call(
                    M::POST,
                    "/jobs",
                    Some(json!({ "project": a.project, "environment": a.environment, "user": a.user, "pipeline_id": a.pipeline, "protected": a.protected })),
                )
                .await?;
            if let Some(f) = &a.kubeconfig {
                write_private(f, &s(&v, "kubeconfig"))?;
            }
            if json_out {
                let mut out = json!({
                    "id": v["id"], "pipeline_id": v["pipeline_id"], "project": v["project_path"],
                    "environment": v["environment"], "user": v["username"], "token": v["token"], "contexts": v["contexts"],
                });
                if let Some(f) = &a.kubeconfig {
                    out["kubeconfig"] = json!(f.display().to_string());
                }
                print_json(&out);
            } else {
                println!(
                    "job {} started (pipeline {}) in {}",
                    s(&v, "id"),
                    s(&v, "pipeline_id"),
                    s(&v, "project_path")
                );
                let ctx = list(&v["contexts"]);
                if ctx.is_empty() {
                    println!("no agent authorizes this job; its kubeconfig has no contexts");
                }
                for c in ctx {
                    println!("context: {}", c.as_str().unwrap_or_default());
                }
                if let Some(f) = &a.kubeconfig {
                    println!("kubeconfig written to {}", f.display());
                } else {
                    println!("job token (shown once): {}", s(&v, "token"));
                }
            }
        }
        Cmd::Job(JobCmd::Finish { id, status }) => {
            let v = api
                .call(
                    M::POST,
                    &format!("/jobs/{id}/finish"),
                    Some(json!({ "status": status })),
                )
                .await?;
            if json_out {
                print_json(&v)
            } else {
                println!("job {} finished ({})", s(&v, "id"), s(&v, "status"))
            }
        }
        Cmd::Job(JobCmd::List) => {
            let v = api.call(M::GET, "/jobs", None).await?;
            if json_out {
                print_json(&v)
            } else {
                table(
                    &["ID", "PROJECT", "PIPELINE", "ENVIRONMENT", "USER", "STATUS"],
                    list(&v)
                        .iter()
                        .map(|j| {
                            vec![
                                s(j, "id"),
                                s(j, "project_path"),
                                s(j, "pipeline_id"),
                                s(j, "environment"),
                                s(j, "username"),
                                s(j, "status"),
                            ]
                        })
                        .collect(),
                )
            }
        }
    }
    Ok(())
}

/// `kasctl agents`: one row per agent.
fn agents_table(v: &Value) {
    let distinct = |reps: &[Value], key: &str| {
        let mut vals: Vec<&str> = reps
            .iter()
            .filter_map(|r| r[key].as_str())
            .filter(|s| !s.is_empty())
            .collect();
        vals.sort_unstable();
        vals.dedup();
        if vals.is_empty() {
            "-".to_string()
        } else {
            vals.join(",")
        }
    };
    table(
        &[
            "ID",
            "NAME",
            "CONFIG PROJECT",
            "REPLICAS",
            "IDLE TUNNELS",
            "BUSY",
            "SINCE",
            "VERSION",
            "KUBERNETES",
            "KAS",
        ],
        list(v)
            .iter()
            .map(|a| {
                let reps = list(&a["replicas"]);
                let first = reps
                    .iter()
                    .filter_map(|r| r["connected_since"].as_u64())
                    .min()
                    .unwrap_or(0);
                vec![
                    s(a, "id"),
                    s(a, "name"),
                    s(a, "config_project"),
                    reps.len().to_string(),
                    s(a, "idle_tunnels"),
                    s(a, "busy_tunnels"),
                    since(first),
                    distinct(reps, "agent_version"),
                    distinct(reps, "kubernetes_version"),
                    distinct(reps, "kas"),
                ]
            })
            .collect(),
    );
    warn_replicas(v);
}

/// `kasctl agents --replicas`: one row per agent replica.
fn replica_table(v: &Value) {
    let dash = |r: &Value, k: &str| match r[k].as_str() {
        Some(x) if !x.is_empty() => x.to_string(),
        _ => "-".to_string(),
    };
    let mut rows = Vec::new();
    for a in list(v) {
        for r in list(&a["replicas"]) {
            rows.push(vec![
                s(a, "id"),
                s(a, "name"),
                s(r, "replica_id"),
                dash(r, "pod_namespace"),
                dash(r, "pod_name"),
                dash(r, "node_name"),
                dash(r, "agent_version"),
                dash(r, "kubernetes_version"),
                since(r["connected_since"].as_u64().unwrap_or(0)),
                dash(r, "kas"),
            ]);
        }
    }
    table(
        &[
            "ID",
            "NAME",
            "REPLICA",
            "NAMESPACE",
            "POD",
            "NODE",
            "VERSION",
            "KUBERNETES",
            "SINCE",
            "KAS",
        ],
        rows,
    );
    warn_replicas(v);
}

/// Prints each replica's warning (such as version skew) on stderr.
fn warn_replicas(v: &Value) {
    for a in list(v) {
        for r in list(&a["replicas"]) {
            if let Some(w) = r["warning"].as_str() {
                eprintln!(
                    "warning: agent {} replica {}: {w}",
                    s(a, "id"),
                    s(r, "replica_id")
                );
            }
        }
    }
}

/// One audit record as a table row: a proxy request or an admin action.
fn audit_row(r: &Value) -> Vec<String> {
    let dash = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let ms = format!("{:.1}", r["duration_ms"].as_f64().unwrap_or(0.0));
    let time = since(r["time"].as_f64().unwrap_or(0.0) as u64);
    if r["kind"] == "admin" {
        return vec![
            time,
            "admin".into(),
            dash(&r["actor"]),
            s(r, "job_id"),
            dash(&r["project"]),
            "-".into(),
            s(r, "agent_id"),
            "-".into(),
            "-".into(),
            r["action"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| s(r, "method")),
            r["target"].as_str().unwrap_or(&s(r, "path")).to_string(),
            s(r, "code"),
            "-".into(),
            "-".into(),
        ];
    }
    vec![
        time,
        "request".into(),
        s(r, "user"),
        s(r, "job_id"),
        s(r, "project"),
        dash(&r["environment"]),
        s(r, "agent_id"),
        s(r, "access_as"),
        r["impersonated"]["username"]
            .as_str()
            .unwrap_or("(agent)")
            .to_string(),
        s(r, "verb"),
        s(r, "path"),
        s(r, "code"),
        s(r, "bytes"),
        ms,
    ]
}

/// `kasctl agent token ...`.
async fn token_cmd(api: &Api, cmd: TokenCmd, json_out: bool) -> Result<()> {
    use http::Method as M;
    let print_json =
        |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    match cmd {
        TokenCmd::Create {
            project,
            agent,
            token_name,
            write_token,
        } => {
            let v = api
                .call(
                    M::POST,
                    "/agents/tokens",
                    Some(json!({ "project": project, "name": agent, "token": token_name })),
                )
                .await?;
            let secret = s(&v, "secret");
            if let Some(f) = &write_token {
                write_private(f, &format!("{secret}\n"))?;
            }
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "token {} (id {}) created for {project}:{agent}",
                    s(&v, "name"),
                    s(&v, "id")
                );
                match &write_token {
                    Some(f) => println!("token written to {} (it is not shown again)", f.display()),
                    None => println!("token (shown once; store it now): {secret}"),
                }
            }
        }
        TokenCmd::List { project, agent } => {
            let q = format!(
                "/agents/tokens?project={}&name={}",
                enc(&project),
                enc(&agent)
            );
            let v = api.call(M::GET, &q, None).await?;
            if json_out {
                print_json(&v);
            } else {
                let ago = |v: &Value| match v.as_u64() {
                    Some(t) => format!("{} ago", since(t)),
                    None => "never".into(),
                };
                table(
                    &["ID", "NAME", "STATUS", "CREATED", "LAST USED"],
                    list(&v)
                        .iter()
                        .map(|t| {
                            vec![
                                s(t, "id"),
                                s(t, "name"),
                                match t["revoked_at"].as_u64() {
                                    Some(r) => format!("revoked {} ago", since(r)),
                                    None => "active".into(),
                                },
                                ago(&t["created_at"]),
                                ago(&t["last_used_at"]),
                            ]
                        })
                        .collect(),
                );
            }
        }
        TokenCmd::Revoke {
            project,
            agent,
            token,
        } => {
            let v = api
                .call(
                    M::POST,
                    "/agents/tokens/revoke",
                    Some(json!({ "project": project, "name": agent, "token": token })),
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "token {} (id {}) of {project}:{agent} revoked; connections made with it are closed",
                    s(&v, "name"),
                    s(&v, "id")
                );
            }
        }
    }
    Ok(())
}

async fn list_paths(api: &Api, cmd: &Cmd, json_out: bool) -> Result<()> {
    let (path, headers): (&str, &[&str]) = match cmd {
        Cmd::Group(_) => ("/groups", &["ID", "PATH", "PARENT ID"]),
        Cmd::Project(_) => ("/projects", &["ID", "PATH", "GROUP ID"]),
        _ => return Err(anyhow!("not a list command")),
    };
    let v = api.call(http::Method::GET, path, None).await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let third = if path == "/groups" {
            "parent_id"
        } else {
            "group_id"
        };
        table(
            headers,
            list(&v)
                .iter()
                .map(|x| vec![s(x, "id"), s(x, "path"), s(x, third)])
                .collect(),
        );
    }
    Ok(())
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `kasctl access explain` as text.
fn explain_text(v: &Value) -> String {
    let job = &v["job"];
    let env = job["environment"]
        .as_str()
        .map(|e| format!(", environment {e}"))
        .unwrap_or_default();
    let mut out = format!(
        "jobs of {}{env} -> agent {} ({})\n",
        s(job, "project"),
        s(&v["agent"], "context"),
        s(&v["agent"], "id")
    );
    if v["allowed"] != Value::Bool(true) {
        out.push_str(&format!(
            "allowed:     no\nreason:      {}\n",
            s(v, "reason")
        ));
        return out;
    }
    out.push_str(&format!(
        "allowed:     yes\ndecided by:  {}\n",
        s(v, "decided_by")
    ));
    out.push_str(&format!("access_as:   {}\n", s(v, "access_as")));
    if let Some(ns) = v["default_namespace"].as_str() {
        out.push_str(&format!("namespace:   {ns}\n"));
    }
    match v["identity"].as_object() {
        None => out.push_str("identity:    the agent's own (no impersonation)\n"),
        Some(i) => {
            out.push_str(&format!(
                "identity:    user {} (for job {} of pipeline {}, run by {})\n",
                i.get("username")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
                s(job, "job_id"),
                s(job, "pipeline_id"),
                s(job, "user")
            ));
            if let Some(uid) = i.get("uid").and_then(Value::as_str) {
                out.push_str(&format!("  uid:       {uid}\n"));
            }
            for g in i
                .get("groups")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                out.push_str(&format!(
                    "  group:     {}\n",
                    g.as_str().unwrap_or_default()
                ));
            }
            for (k, vals) in i
                .get("extra")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let vals: Vec<&str> = vals
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                out.push_str(&format!("  extra:     {k} = {}\n", vals.join(", ")));
            }
        }
    }
    out
}

/// `--since`: a duration ago (`30s`, `15m`, `2h`, `7d`) or unix seconds.
fn parse_since(v: &str) -> Result<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if let Ok(n) = v.parse::<u64>() {
        return Ok(n);
    }
    let (num, unit) = v.split_at(v.len().saturating_sub(1));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--since `{v}`: use 30s, 15m, 2h, 7d or unix seconds"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => anyhow::bail!("--since `{v}`: use 30s, 15m, 2h, 7d or unix seconds"),
    };
    Ok(now.saturating_sub(secs))
}
