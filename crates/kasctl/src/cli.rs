//! The command line: what kasctl accepts (clap), nothing more.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "kasctl",
    version,
    about = "Administer kas: groups, projects, agents, environments, CI jobs"
)]
pub struct Cli {
    /// kas API listener URL.
    #[arg(
        long,
        env = "KASCTL_SERVER",
        default_value = "http://127.0.0.1:8153",
        global = true
    )]
    pub server: String,
    /// File holding the kas admin token.
    #[arg(
        long,
        env = "KASCTL_TOKEN_FILE",
        default_value = "./kas-data/admin-token",
        global = true
    )]
    pub token_file: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
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
    Audit(AuditArgs),
    /// Access questions: may jobs of a project use an agent, and as whom?
    #[command(subcommand)]
    Access(AccessCmd),
    /// kas's work in agents' clusters: managed applications.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g.
    /// `source <(kasctl completion bash)`.
    Completion { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
pub enum AccessCmd {
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
pub enum PathCmd {
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
pub enum AgentCmd {
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
pub enum TokenCmd {
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
pub enum ConfigCmd {
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
pub enum EnvCmd {
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
pub enum JobCmd {
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
pub struct StartArgs {
    pub project: String,
    #[arg(long)]
    pub environment: Option<String>,
    /// The user the job runs for.
    #[arg(long)]
    pub user: String,
    /// Pipeline id (a new one is allocated if absent).
    #[arg(long)]
    pub pipeline: Option<u64>,
    /// The job runs for a protected branch or tag (for `protected_branches_only`).
    #[arg(long)]
    pub protected: bool,
    /// Write the job's kubeconfig here (mode 0600).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only `request` records (proxy requests) or only `admin` records.
    #[arg(long, value_parser = ["request", "admin"])]
    pub kind: Option<String>,
    #[arg(long)]
    pub job: Option<u64>,
    #[arg(long)]
    pub project: Option<String>,
    /// Agent id.
    #[arg(long)]
    pub agent: Option<u64>,
    /// Only records since: a duration ago (30s, 15m, 2h, 7d) or unix seconds.
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many (the newest).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Managed applications: Helm charts from kas's catalogue, installed by pods
    /// `install-<app>` (`upgrade-`, `uninstall-`) in the namespace gitlab-managed-apps.
    #[command(subcommand)]
    App(AppCmd),
    /// EKS: prepare a cluster's provisioning role (external id, trust policy).
    #[command(subcommand)]
    Eks(EksCmd),
    /// Create a cluster (returns at once; follow it with `kasctl cluster show --watch`).
    #[command(subcommand)]
    Create(CreateCmd),
    /// A cluster kas creates (or all of them), with its stack's events.
    Show {
        name: Option<String>,
        /// Follow it until it is ready, errored or deleted.
        #[arg(long)]
        watch: bool,
    },
    /// Delete a cluster: its CloudFormation stack, and its agent.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum AppCmd {
    /// Install an application of the catalogue (returns at once; see `list`).
    Install(AppChange),
    /// Upgrade an installed application (a new version, new values or both).
    Upgrade(AppChange),
    /// Uninstall an application.
    Uninstall {
        /// The agent: id or <configuration project>:<name>.
        agent: String,
        app: String,
    },
    /// The catalogue and the agent's applications with their state.
    List {
        /// The agent: id or <configuration project>:<name>.
        agent: String,
    },
}

#[derive(Debug, Args)]
pub struct AppChange {
    /// The agent: id or <configuration project>:<name>.
    pub agent: String,
    /// The application's catalogue name (see `kasctl cluster app list`).
    pub app: String,
    /// Helm values (YAML) over the catalogue's defaults.
    #[arg(long)]
    pub values: Option<std::path::PathBuf>,
    /// The chart version (default: the catalogue's).
    #[arg(long)]
    pub version: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum EksCmd {
    /// A new cluster record: prints kas's AWS account, the cluster's external id and
    /// the trust policy to give the provisioning role in your account.
    Prepare {
        name: String,
        /// The project the cluster (and its agent) belongs to.
        #[arg(long)]
        project: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreateCmd {
    /// An Amazon EKS cluster in your AWS account (prepared with `kasctl cluster eks prepare`).
    Eks(EksCreateArgs),
}

#[derive(Debug, Args)]
pub struct EksCreateArgs {
    pub name: String,
    /// The provisioning role kas assumes (trusting kas's account with the external id).
    #[arg(long)]
    pub role_arn: String,
    #[arg(long)]
    pub region: String,
    #[arg(long)]
    pub vpc: String,
    /// Subnet ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub subnets: Vec<String>,
    #[arg(long)]
    pub security_group: String,
    /// The cluster management role EKS assumes.
    #[arg(long)]
    pub cluster_role_arn: String,
    #[arg(long, default_value = "1.32")]
    pub kubernetes_version: String,
    #[arg(long, default_value = "m5.large")]
    pub instance_type: String,
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
}
