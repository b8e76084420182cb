//! The authorization decision for one (job, agent) pair.

use crate::config::{AccessAs, AgentConfig};
use crate::{environment_matches, path_within, root_of};
use std::fmt;

/// A group or project: numeric id and full path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub id: u64,
    pub path: String,
}

/// The environment a job deploys to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    pub name: String,
    pub slug: String,
    pub tier: String,
}

/// What the control plane knows about a running CI job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobContext {
    pub job_id: u64,
    pub pipeline_id: u64,
    pub project: Named,
    /// Every group the project is under, root first.
    pub groups: Vec<Named>,
    pub environment: Option<Environment>,
    pub username: String,
    /// Whether the job runs for a protected branch or tag.
    pub protected_ref: bool,
}

/// The agent being used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRef {
    pub id: u64,
    pub name: String,
    pub config_project: Named,
}

/// Which kind of `ci_access` entry authorized the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Project,
    Group,
    /// Jobs of the agent's own configuration project may always use it, as the agent.
    ConfigProject,
}

/// The `access_as` mode that applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Agent,
    CiJob,
    Impersonate,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Agent => "agent",
            Mode::CiJob => "ci_job",
            Mode::Impersonate => "impersonate",
        }
    }
}

/// The identity the agent impersonates towards the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    /// In a stable order.
    pub extra: Vec<(String, Vec<String>)>,
}

impl Identity {
    /// As the audit trail and `kasctl access explain` show it (extras by key; values of
    /// a key that appears twice are kept together).
    pub fn to_api(&self) -> kas_api::Identity {
        let mut extra = std::collections::BTreeMap::<String, Vec<String>>::new();
        for (k, v) in &self.extra {
            extra
                .entry(k.clone())
                .or_default()
                .extend(v.iter().cloned());
        }
        kas_api::Identity {
            username: self.username.clone(),
            uid: self.uid.clone(),
            groups: self.groups.clone(),
            extra,
        }
    }
}

/// A positive decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub kind: EntryKind,
    /// Index in `ci_access.projects` or `ci_access.groups` (0 for the configuration project).
    pub index: usize,
    /// The `id` of the deciding entry (the path).
    pub entry_id: String,
    pub default_namespace: Option<String>,
    pub mode: Mode,
    /// `None` for `access_as: agent`.
    pub identity: Option<Identity>,
}

/// Why a job may not use an agent. The text is safe to show to the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// The job's project is under another root group than the agent's configuration project.
    OtherRootGroup { project: String, root: String },
    /// An entry covers the project, but none of them lists the job's environment.
    EnvironmentNotAllowed {
        project: String,
        environment: Option<String>,
    },
    /// No entry covers the project.
    NotAuthorized { project: String },
    /// The deciding entry allows only jobs on protected branches.
    ProtectedBranchesOnly { project: String, entry: String },
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::OtherRootGroup { project, root } => write!(
                f,
                "project {project} is not under the root group {root} of the agent's configuration project"
            ),
            DenyReason::EnvironmentNotAllowed { project, environment: Some(e) } => write!(
                f,
                "the agent's ci_access allows project {project} only for other environments than {e}"
            ),
            DenyReason::EnvironmentNotAllowed { project, environment: None } => write!(
                f,
                "the agent's ci_access allows project {project} only for jobs that run in an environment"
            ),
            DenyReason::NotAuthorized { project } => {
                write!(f, "the agent's ci_access does not authorize project {project}")
            }
            DenyReason::ProtectedBranchesOnly { project, entry } => write!(
                f,
                "the agent's ci_access entry {entry} allows project {project} only for jobs on protected branches"
            ),
        }
    }
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Allowed),
    Deny(DenyReason),
}

/// Decides whether `job` may use `agent` configured with `config`, and as whom.
///
/// Project entries take precedence over group entries; among groups the deepest one
/// covering the project wins; the first entry in file order breaks ties. The deciding
/// entry alone says whether jobs on unprotected branches may use the agent (as GitLab:
/// the most specific entry is used).
pub fn decide(agent: &AgentRef, config: &AgentConfig, job: &JobContext) -> Decision {
    let root = root_of(&agent.config_project.path);
    let project_path = job.project.path.as_str();
    let is_config_project = project_path.eq_ignore_ascii_case(&agent.config_project.path);
    if !root_of(project_path).eq_ignore_ascii_case(root) {
        return Decision::Deny(DenyReason::OtherRootGroup {
            project: project_path.to_string(),
            root: root.to_string(),
        });
    }
    let env_name = job.environment.as_ref().map(|e| e.name.as_str());
    let env_ok = |envs: &Option<Vec<String>>| match (envs, env_name) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(list), Some(name)) => list.iter().any(|p| environment_matches(p, name)),
    };
    let mut covered = false;
    let ca = &config.ci_access;
    let protected_only = |only: bool, id: &str| {
        (only && !job.protected_ref).then(|| {
            Decision::Deny(DenyReason::ProtectedBranchesOnly {
                project: project_path.to_string(),
                entry: id.to_string(),
            })
        })
    };
    for (i, e) in ca.projects.iter().enumerate() {
        if e.id.eq_ignore_ascii_case(project_path) {
            covered = true;
            if env_ok(&e.environments) {
                if let Some(deny) = protected_only(e.protected_branches_only, &e.id) {
                    return deny;
                }
                return allow(
                    agent,
                    job,
                    EntryKind::Project,
                    i,
                    &e.id,
                    &e.default_namespace,
                    &e.access_as,
                );
            }
        }
    }
    let mut best: Option<(usize, &crate::config::GroupEntry)> = None;
    for (i, e) in ca.groups.iter().enumerate() {
        if path_within(project_path, &e.id) {
            covered = true;
            if env_ok(&e.environments) && best.is_none_or(|(_, b)| e.id.len() > b.id.len()) {
                best = Some((i, e));
            }
        }
    }
    if let Some((i, e)) = best {
        if let Some(deny) = protected_only(e.protected_branches_only, &e.id) {
            return deny;
        }
        return allow(
            agent,
            job,
            EntryKind::Group,
            i,
            &e.id,
            &e.default_namespace,
            &e.access_as,
        );
    }
    if is_config_project {
        return allow(
            agent,
            job,
            EntryKind::ConfigProject,
            0,
            &agent.config_project.path,
            &None,
            &AccessAs::Agent,
        );
    }
    Decision::Deny(if covered {
        DenyReason::EnvironmentNotAllowed {
            project: project_path.to_string(),
            environment: env_name.map(str::to_string),
        }
    } else {
        DenyReason::NotAuthorized {
            project: project_path.to_string(),
        }
    })
}

fn allow(
    agent: &AgentRef,
    job: &JobContext,
    kind: EntryKind,
    index: usize,
    entry_id: &str,
    default_namespace: &Option<String>,
    access_as: &AccessAs,
) -> Decision {
    let (mode, identity) = match access_as {
        AccessAs::Agent => (Mode::Agent, None),
        AccessAs::CiJob => (Mode::CiJob, Some(ci_job_identity(agent, job))),
        AccessAs::Impersonate(i) => (
            Mode::Impersonate,
            Some(Identity {
                username: i.username.clone(),
                uid: i.uid.clone(),
                groups: i.groups.clone(),
                extra: i
                    .extra
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }),
        ),
    };
    Decision::Allow(Allowed {
        kind,
        index,
        entry_id: entry_id.to_string(),
        default_namespace: default_namespace.clone(),
        mode,
        identity,
    })
}

/// The identity of `access_as: ci_job`, exactly as documented for GitLab so that RBAC
/// rules written for it keep working.
pub fn ci_job_identity(agent: &AgentRef, job: &JobContext) -> Identity {
    let env = job.environment.as_ref();
    let mut groups = vec!["gitlab:ci_job".to_string()];
    for g in &job.groups {
        groups.push(format!("gitlab:group:{}", g.id));
        if let Some(e) = env {
            groups.push(format!("gitlab:group_env_tier:{}:{}", g.id, e.tier));
        }
    }
    let p = job.project.id;
    groups.push(format!("gitlab:project:{p}"));
    if let Some(e) = env {
        groups.push(format!("gitlab:project_env:{p}:{}", e.slug));
        groups.push(format!("gitlab:project_env_tier:{p}:{}", e.tier));
    }
    let mut extra = vec![
        (
            "agent.gitlab.com/id".to_string(),
            vec![agent.id.to_string()],
        ),
        (
            "agent.gitlab.com/config_project_id".to_string(),
            vec![agent.config_project.id.to_string()],
        ),
        (
            "agent.gitlab.com/project_id".to_string(),
            vec![p.to_string()],
        ),
        (
            "agent.gitlab.com/ci_pipeline_id".to_string(),
            vec![job.pipeline_id.to_string()],
        ),
        (
            "agent.gitlab.com/ci_job_id".to_string(),
            vec![job.job_id.to_string()],
        ),
        (
            "agent.gitlab.com/username".to_string(),
            vec![job.username.clone()],
        ),
    ];
    if let Some(e) = env {
        extra.push((
            "agent.gitlab.com/environment_slug".to_string(),
            vec![e.slug.clone()],
        ));
        extra.push((
            "agent.gitlab.com/environment_tier".to_string(),
            vec![e.tier.clone()],
        ));
    }
    Identity {
        username: format!("gitlab:ci_job:{}", job.job_id),
        uid: None,
        groups,
        extra,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_agent_config;

    fn agent() -> AgentRef {
        AgentRef {
            id: 7,
            name: "prod".into(),
            config_project: Named {
                id: 100,
                path: "group1/agents".into(),
            },
        }
    }

    fn job(path: &str, env: Option<(&str, &str)>) -> JobContext {
        let segs: Vec<&str> = path.split('/').collect();
        let groups = (1..segs.len())
            .map(|i| Named {
                id: 20 + i as u64,
                path: segs[..i].join("/"),
            })
            .collect();
        JobContext {
            job_id: 1074499489,
            pipeline_id: 900,
            project: Named {
                id: 150,
                path: path.into(),
            },
            groups,
            environment: env.map(|(n, t)| Environment {
                name: n.into(),
                slug: n.replace('/', "-"),
                tier: t.into(),
            }),
            username: "alice".into(),
            protected_ref: false,
        }
    }

    fn cfg(yaml: &str) -> AgentConfig {
        parse_agent_config(yaml, "group1/agents").expect("valid").0
    }

    fn allowed(d: Decision) -> Allowed {
        match d {
            Decision::Allow(a) => a,
            Decision::Deny(r) => panic!("denied: {r}"),
        }
    }

    fn denied(d: Decision) -> DenyReason {
        match d {
            Decision::Deny(r) => r,
            Decision::Allow(a) => panic!("allowed: {a:?}"),
        }
    }

    #[test]
    fn seed_example_identity() {
        // group1 (23) / group1-1 (25) / project1 (150), environment prod of tier production.
        let mut j = job("group1/group1-1/project1", Some(("prod", "production")));
        j.groups = vec![
            Named {
                id: 23,
                path: "group1".into(),
            },
            Named {
                id: 25,
                path: "group1/group1-1".into(),
            },
        ];
        let c = cfg("ci_access:\n  projects:\n    - id: group1/group1-1/project1\n      access_as: {ci_job: {}}\n");
        let a = allowed(decide(&agent(), &c, &j));
        assert_eq!(a.mode, Mode::CiJob);
        let id = a.identity.expect("identity");
        assert_eq!(id.username, "gitlab:ci_job:1074499489");
        assert_eq!(
            id.groups,
            [
                "gitlab:ci_job",
                "gitlab:group:23",
                "gitlab:group_env_tier:23:production",
                "gitlab:group:25",
                "gitlab:group_env_tier:25:production",
                "gitlab:project:150",
                "gitlab:project_env:150:prod",
                "gitlab:project_env_tier:150:production"
            ]
        );
        let extra: Vec<(&str, &str)> = id
            .extra
            .iter()
            .map(|(k, v)| (k.as_str(), v[0].as_str()))
            .collect();
        assert_eq!(
            extra,
            [
                ("agent.gitlab.com/id", "7"),
                ("agent.gitlab.com/config_project_id", "100"),
                ("agent.gitlab.com/project_id", "150"),
                ("agent.gitlab.com/ci_pipeline_id", "900"),
                ("agent.gitlab.com/ci_job_id", "1074499489"),
                ("agent.gitlab.com/username", "alice"),
                ("agent.gitlab.com/environment_slug", "prod"),
                ("agent.gitlab.com/environment_tier", "production"),
            ]
        );
    }

    #[test]
    fn ci_job_without_environment_has_no_env_groups_or_extras() {
        let c = cfg("ci_access:\n  groups:\n    - id: group1\n      access_as: {ci_job: {}}\n");
        let id = allowed(decide(&agent(), &c, &job("group1/x/p", None)))
            .identity
            .expect("identity");
        assert_eq!(
            id.groups,
            [
                "gitlab:ci_job",
                "gitlab:group:21",
                "gitlab:group:22",
                "gitlab:project:150"
            ]
        );
        assert!(id.extra.iter().all(|(k, _)| !k.contains("environment")));
        assert_eq!(id.extra.len(), 6);
    }

    #[test]
    fn matrix() {
        let c = cfg(r#"
ci_access:
  projects:
    - id: group1/web/shop
      default_namespace: shop
    - id: group1/web/review-app
      environments: [staging, review/*]
      access_as: {ci_job: {}}
    - id: other/listed
  groups:
    - id: group1/platform
      environments: [production]
      access_as: {impersonate: {username: deployer, groups: [ops], uid: "9", extra: {k: [v]}}}
    - id: group1/teams
    - id: other
"#);
        // Allowed project, default namespace carried, agent identity.
        let a = allowed(decide(&agent(), &c, &job("group1/web/shop", None)));
        assert_eq!(
            (a.kind, a.index, a.mode),
            (EntryKind::Project, 0, Mode::Agent)
        );
        assert_eq!(a.default_namespace.as_deref(), Some("shop"));
        assert!(a.identity.is_none());
        // Project inside an allowed group's subgroup.
        let a = allowed(decide(&agent(), &c, &job("group1/teams/a/b/deep", None)));
        assert_eq!((a.kind, a.index), (EntryKind::Group, 1));
        // Other root group refused even if listed (as project and as group).
        assert!(matches!(
            denied(decide(&agent(), &c, &job("other/listed", None))),
            DenyReason::OtherRootGroup { .. }
        ));
        assert!(matches!(
            denied(decide(&agent(), &c, &job("other/x/y", None))),
            DenyReason::OtherRootGroup { .. }
        ));
        // Environment match, wildcard, no match, no environment.
        let a = allowed(decide(
            &agent(),
            &c,
            &job("group1/web/review-app", Some(("staging", "staging"))),
        ));
        assert_eq!(a.mode, Mode::CiJob);
        allowed(decide(
            &agent(),
            &c,
            &job(
                "group1/web/review-app",
                Some(("review/feature-1", "development")),
            ),
        ));
        let d = denied(decide(
            &agent(),
            &c,
            &job("group1/web/review-app", Some(("production", "production"))),
        ));
        assert!(matches!(d, DenyReason::EnvironmentNotAllowed { .. }), "{d}");
        assert!(d.to_string().contains("production"));
        let d = denied(decide(&agent(), &c, &job("group1/web/review-app", None)));
        assert!(matches!(
            d,
            DenyReason::EnvironmentNotAllowed {
                environment: None,
                ..
            }
        ));
        // Group with environments: impersonate identity.
        let a = allowed(decide(
            &agent(),
            &c,
            &job("group1/platform/api", Some(("production", "production"))),
        ));
        assert_eq!(a.mode, Mode::Impersonate);
        let id = a.identity.expect("identity");
        assert_eq!(
            (id.username.as_str(), id.uid.as_deref()),
            ("deployer", Some("9"))
        );
        assert_eq!(id.groups, ["ops"]);
        assert_eq!(id.extra, [("k".to_string(), vec!["v".to_string()])]);
        denied(decide(
            &agent(),
            &c,
            &job("group1/platform/api", Some(("staging", "staging"))),
        ));
        // Not listed at all.
        let d = denied(decide(&agent(), &c, &job("group1/unlisted", None)));
        assert_eq!(
            d,
            DenyReason::NotAuthorized {
                project: "group1/unlisted".into()
            }
        );
        // A prefix that is not a path ancestor does not match.
        denied(decide(&agent(), &c, &job("group1/teamsx/p", None)));
        // The configuration project itself may use its agent.
        let a = allowed(decide(&agent(), &c, &job("group1/agents", None)));
        assert_eq!((a.kind, a.mode), (EntryKind::ConfigProject, Mode::Agent));
    }

    #[test]
    fn project_entry_beats_group_and_deepest_group_wins() {
        let c = cfg(r#"
ci_access:
  projects:
    - id: group1/a/b/p
      default_namespace: from-project
  groups:
    - id: group1
      default_namespace: root
    - id: group1/a/b
      default_namespace: deep
    - id: group1/a
      default_namespace: middle
"#);
        let a = allowed(decide(&agent(), &c, &job("group1/a/b/p", None)));
        assert_eq!(a.default_namespace.as_deref(), Some("from-project"));
        let a = allowed(decide(&agent(), &c, &job("group1/a/b/q", None)));
        assert_eq!(a.default_namespace.as_deref(), Some("deep"));
        let a = allowed(decide(&agent(), &c, &job("group1/a/q", None)));
        assert_eq!(a.default_namespace.as_deref(), Some("middle"));
        let a = allowed(decide(&agent(), &c, &job("group1/z", None)));
        assert_eq!(a.default_namespace.as_deref(), Some("root"));
    }

    #[test]
    fn paths_compare_case_insensitively() {
        let c = cfg("ci_access:\n  projects: [{id: Group1/Web/Shop}]\n");
        allowed(decide(&agent(), &c, &job("group1/web/shop", None)));
    }

    #[test]
    fn protected_branches_only_is_decided_by_the_most_specific_entry() {
        // GitLab's example: the project entry supersedes the group's.
        let c = cfg("ci_access:\n  projects:\n    - id: group1/web/shop\n      protected_branches_only: false\n  groups:\n    - id: group1\n      protected_branches_only: true\n");
        let a = agent();
        assert!(matches!(
            decide(&a, &c, &job("group1/web/shop", None)),
            Decision::Allow(_)
        ));
        let other = job("group1/web/blog", None);
        match decide(&a, &c, &other) {
            Decision::Deny(r @ DenyReason::ProtectedBranchesOnly { .. }) => {
                assert!(
                    r.to_string()
                        .contains("only for jobs on protected branches"),
                    "{r}"
                );
            }
            d => panic!("{d:?}"),
        }
        let mut protected = other;
        protected.protected_ref = true;
        assert!(matches!(decide(&a, &c, &protected), Decision::Allow(_)));
    }
}
