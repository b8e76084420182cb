//! Parsing and validation of an agent's `config.yaml`.

use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// At most this many `ci_access.projects` entries per agent (as in the seeds).
pub const MAX_PROJECTS: usize = 100;
/// At most this many `ci_access.groups` entries per agent (as in the seeds).
pub const MAX_GROUPS: usize = 100;

/// An agent's configuration (`.gitlab/agents/<name>/config.yaml`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default)]
    pub ci_access: CiAccess,
    /// In-cluster services the application may reach through the agent.
    #[serde(default)]
    pub service_access: Vec<crate::services::ServiceEntry>,
}

impl AgentConfig {
    /// The parsed `service_access` entries (invalid ones were refused on validation,
    /// so they are skipped here).
    pub fn allowed_services(&self) -> Vec<crate::services::AllowedService> {
        self.service_access
            .iter()
            .filter_map(|e| crate::services::parse_service_url(&e.url).ok())
            .collect()
    }
}

/// Which projects and groups may use the agent from CI/CD jobs.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiAccess {
    #[serde(default)]
    pub projects: Vec<ProjectEntry>,
    #[serde(default)]
    pub groups: Vec<GroupEntry>,
}

/// `ci_access.projects[]`: one project, by path.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectEntry {
    pub id: String,
    pub default_namespace: Option<String>,
    pub environments: Option<Vec<String>>,
    #[serde(default)]
    pub access_as: AccessAs,
}

/// `ci_access.groups[]`: every project in the group and its subgroups.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupEntry {
    pub id: String,
    pub default_namespace: Option<String>,
    pub environments: Option<Vec<String>>,
    #[serde(default)]
    pub access_as: AccessAs,
}

/// `access_as`: whose identity the cluster sees. Exactly one key: `agent`, `ci_job`
/// or `impersonate`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(try_from = "AccessAsRaw")]
pub enum AccessAs {
    /// The agent's own ServiceAccount; no impersonation.
    #[default]
    Agent,
    /// Impersonate the CI job (user `gitlab:ci_job:<id>` and its groups and extras).
    CiJob,
    /// A static identity.
    Impersonate(ImpersonateIdentity),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessAsRaw {
    #[serde(default, deserialize_with = "present")]
    agent: bool,
    #[serde(default, deserialize_with = "present")]
    ci_job: bool,
    impersonate: Option<ImpersonateIdentity>,
}

impl TryFrom<AccessAsRaw> for AccessAs {
    type Error = String;
    fn try_from(r: AccessAsRaw) -> Result<Self, String> {
        match (r.agent, r.ci_job, r.impersonate) {
            (true, false, None) => Ok(AccessAs::Agent),
            (false, true, None) => Ok(AccessAs::CiJob),
            (false, false, Some(i)) => Ok(AccessAs::Impersonate(i)),
            (false, false, None) => {
                Err("must hold one of `agent`, `ci_job` or `impersonate`".into())
            }
            _ => Err("must hold only one of `agent`, `ci_job` or `impersonate`".into()),
        }
    }
}

/// `access_as.impersonate`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImpersonateIdentity {
    pub username: String,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    // `ci_job: {}` and `ci_job:` (null) both mean "this mode, no options".
    Option::<Empty>::deserialize(d).map(|_| true)
}

/// One problem in a configuration, naming the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Why a configuration was rejected: every problem found, each naming its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid agent configuration: {}", join(.problems))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

fn join(p: &[Problem]) -> String {
    p.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Accepted, but worth telling the person who set the configuration.
pub type ConfigWarning = Problem;

/// Parses and validates `config.yaml` of an agent whose configuration project is
/// `config_project_path`. Returns the configuration and warnings (entries that are
/// valid but can never match, such as another root group).
pub fn parse_agent_config(
    yaml: &str,
    config_project_path: &str,
) -> Result<(AgentConfig, Vec<ConfigWarning>), ConfigError> {
    let config: AgentConfig = if yaml.trim().is_empty() {
        AgentConfig::default()
    } else {
        let de = serde_yaml_ng::Deserializer::from_str(yaml);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let message = e.into_inner().to_string();
            // The YAML error already starts with the path; keep it once.
            let message = message
                .strip_prefix(&format!("{field}: "))
                .map(str::to_string)
                .unwrap_or(message);
            ConfigError {
                problems: vec![Problem {
                    field: if field == "." { String::new() } else { field },
                    message,
                }],
            }
        })?
    };
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let root = crate::root_of(config_project_path);
    let ca = &config.ci_access;
    if ca.projects.len() > MAX_PROJECTS {
        problems.push(problem(
            "ci_access.projects",
            format!(
                "at most {MAX_PROJECTS} projects are allowed, found {}",
                ca.projects.len()
            ),
        ));
    }
    if ca.groups.len() > MAX_GROUPS {
        problems.push(problem(
            "ci_access.groups",
            format!(
                "at most {MAX_GROUPS} groups are allowed, found {}",
                ca.groups.len()
            ),
        ));
    }
    let entries = ca
        .projects
        .iter()
        .enumerate()
        .map(|(i, e)| {
            (
                format!("ci_access.projects[{i}]"),
                &e.id,
                &e.default_namespace,
                &e.environments,
                &e.access_as,
            )
        })
        .chain(ca.groups.iter().enumerate().map(|(i, e)| {
            (
                format!("ci_access.groups[{i}]"),
                &e.id,
                &e.default_namespace,
                &e.environments,
                &e.access_as,
            )
        }));
    for (i, e) in config.service_access.iter().enumerate() {
        if let Err(m) = crate::services::parse_service_url(&e.url) {
            problems.push(problem(format!("service_access[{i}].url"), m));
        }
    }
    let mut seen = HashSet::new();
    for (at, id, ns, envs, access_as) in entries {
        if let Err(m) = validate_path(id) {
            problems.push(problem(format!("{at}.id"), m));
        } else {
            let kind = at.split('[').next().unwrap_or_default().to_string();
            if !seen.insert((kind, id.to_ascii_lowercase())) {
                problems.push(problem(
                    format!("{at}.id"),
                    format!("`{id}` is listed twice"),
                ));
            }
            if !crate::root_of(id).eq_ignore_ascii_case(root) {
                warnings.push(problem(
                    format!("{at}.id"),
                    format!(
                        "`{id}` is not under the root group `{root}` of the configuration project; \
                         it will never be authorized"
                    ),
                ));
            }
        }
        if let Some(ns) = ns {
            if !is_dns_label(ns) {
                problems.push(problem(
                    format!("{at}.default_namespace"),
                    format!("`{ns}` is not a valid namespace name (lowercase letters, digits and '-', at most 63, starting and ending with a letter or digit)"),
                ));
            }
        }
        if let Some(envs) = envs {
            for (j, e) in envs.iter().enumerate() {
                if e.trim().is_empty() {
                    problems.push(problem(
                        format!("{at}.environments[{j}]"),
                        "must not be empty",
                    ));
                }
            }
        }
        if let AccessAs::Impersonate(i) = access_as {
            let f = format!("{at}.access_as.impersonate");
            if i.username.trim().is_empty() {
                problems.push(problem(
                    format!("{f}.username"),
                    "is required and must not be empty",
                ));
            }
            if i.uid.as_deref().is_some_and(|u| u.trim().is_empty()) {
                problems.push(problem(format!("{f}.uid"), "must not be empty when set"));
            }
            for (j, g) in i.groups.iter().enumerate() {
                if g.trim().is_empty() {
                    problems.push(problem(format!("{f}.groups[{j}]"), "must not be empty"));
                }
            }
            for k in i.extra.keys() {
                if k.trim().is_empty() {
                    problems.push(problem(format!("{f}.extra"), "keys must not be empty"));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok((config, warnings))
    } else {
        Err(ConfigError { problems })
    }
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        field: field.into(),
        message: message.into(),
    }
}

/// A group or project path: segments of letters, digits, `_`, `-`, `.` separated by `/`.
pub(crate) fn validate_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("must not be empty".into());
    }
    if path.len() > 255 {
        return Err("is longer than 255 characters".into());
    }
    for seg in path.split('/') {
        if seg.is_empty() {
            return Err(format!("`{path}` is not a path (empty segment)"));
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
            || seg.starts_with(['-', '.'])
        {
            return Err(format!(
                "`{path}` is not a path: segment `{seg}` may hold only letters, digits, '_', '-' and '.', and must not start with '-' or '.'"
            ));
        }
    }
    Ok(())
}

/// A DNS-1123 label (Kubernetes namespace names).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(yaml: &str) -> String {
        parse_agent_config(yaml, "acme/platform/agents")
            .expect_err("should be rejected")
            .to_string()
    }

    #[test]
    fn full_example_parses() {
        let yaml = r#"
ci_access:
  projects:
    - id: acme/web/shop
      default_namespace: shop
      environments: [staging, review/*]
      access_as: {ci_job: {}}
    - id: acme/web/blog
  groups:
    - id: acme/platform
      access_as:
        impersonate:
          username: deployer
          uid: "42"
          groups: [deployers]
          extra: {team: [web, ops]}
"#;
        let (c, w) = parse_agent_config(yaml, "acme/platform/agents").expect("valid");
        assert!(w.is_empty());
        assert_eq!(c.ci_access.projects.len(), 2);
        assert_eq!(c.ci_access.projects[0].access_as, AccessAs::CiJob);
        assert_eq!(c.ci_access.projects[1].access_as, AccessAs::Agent);
        match &c.ci_access.groups[0].access_as {
            AccessAs::Impersonate(i) => {
                assert_eq!(i.username, "deployer");
                assert_eq!(i.extra["team"], vec!["web", "ops"]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn empty_config_is_valid() {
        let (c, _) = parse_agent_config("", "a/b").expect("valid");
        assert!(c.ci_access.projects.is_empty());
        let (c, _) = parse_agent_config(
            "ci_access:\n  projects:\n    - id: a/x\n      access_as:\n        ci_job:\n",
            "a/b",
        )
        .expect("valid");
        assert_eq!(c.ci_access.projects[0].access_as, AccessAs::CiJob);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(
            err("ci_acess: {}").contains("ci_acess"),
            "{}",
            err("ci_acess: {}")
        );
        let e = err("ci_access:\n  projects:\n    - id: acme/x\n      access_as: {root: {}}\n");
        assert!(e.contains("ci_access.projects[0].access_as"), "{e}");
        let e = err("ci_access:\n  projects:\n    - id: acme/x\n      access_as: {impersonate: {username: ''}}\n");
        assert!(
            e.contains("ci_access.projects[0].access_as.impersonate.username"),
            "{e}"
        );
        let e = err("ci_access:\n  groups:\n    - default_namespace: x\n");
        assert!(e.contains("ci_access.groups[0]") && e.contains("id"), "{e}");
        let e = err("ci_access:\n  projects:\n    - id: acme/x\n      default_namespace: Bad_NS\n");
        assert!(e.contains("ci_access.projects[0].default_namespace"), "{e}");
        let e = err("ci_access:\n  projects:\n    - id: /acme//x\n");
        assert!(e.contains("ci_access.projects[0].id"), "{e}");
        let e = err("ci_access:\n  projects: [{id: acme/x}, {id: ACME/x}]\n");
        assert!(e.contains("listed twice"), "{e}");
        let e = err("ci_access: [1, 2]");
        assert!(e.contains("ci_access"), "{e}");
        let e = err("ci_access:\n  projects:\n    - id: acme/x\n      environments: ['']\n");
        assert!(e.contains("ci_access.projects[0].environments[0]"), "{e}");
    }

    #[test]
    fn limits() {
        let mut yaml = String::from("ci_access:\n  projects:\n");
        for i in 0..=MAX_PROJECTS {
            yaml.push_str(&format!("    - id: acme/p{i}\n"));
        }
        assert!(err(&yaml).contains("at most 100 projects"));
        let mut yaml = String::from("ci_access:\n  groups:\n");
        for i in 0..MAX_GROUPS {
            yaml.push_str(&format!("    - id: acme/g{i}\n"));
        }
        assert!(parse_agent_config(&yaml, "acme/a").is_ok());
    }

    #[test]
    fn other_root_is_a_warning() {
        let (_, w) = parse_agent_config("ci_access:\n  projects: [{id: other/x}]\n", "acme/a")
            .expect("valid");
        assert_eq!(w.len(), 1);
        assert!(w[0].to_string().contains("root group `acme`"));
    }
}
