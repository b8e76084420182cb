//! Parsing and validation of an agent's `config.yaml`.

use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// At most this many `ci_access.projects` entries per agent (as in the seeds).
pub const MAX_PROJECTS: usize = 100;
/// At most this many `ci_access.groups` entries per agent (as in the seeds).
pub const MAX_GROUPS: usize = 100;

/// An agent's configuration (`.gitlab/agents/<name>/config.yaml`).
///
/// A configuration written for GitLab is accepted as it is: the sections kas does not
/// implement (`gitops`, `user_access`, `container_scanning`, ...) and top-level keys it
/// does not know are kept aside in [`AgentConfig::ignored`] and reported as warnings,
/// while the sections kas implements (`ci_access`, `service_access`,
/// `observability.logging`) are strict: a misspelt key there is an error naming it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentConfig {
    pub ci_access: CiAccess,
    /// In-cluster services the application may reach through the agent.
    pub service_access: Vec<crate::services::ServiceEntry>,
    pub observability: Observability,
    /// Namespaces kas creates for CI jobs' environments (absent: none).
    pub managed_namespaces: Option<ManagedNamespaces>,
    /// Top-level keys kas does not implement, in file order.
    pub ignored: Vec<String>,
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

impl<'de> Deserialize<'de> for AgentConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = AgentConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of configuration sections")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<AgentConfig, E> {
                Ok(AgentConfig::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<AgentConfig, A::Error> {
                let mut c = AgentConfig::default();
                let mut seen = HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("`{key}` appears twice")));
                    }
                    match key.as_str() {
                        "ci_access" => {
                            c.ci_access = map.next_value::<Option<CiAccess>>()?.unwrap_or_default()
                        }
                        "service_access" => {
                            c.service_access = map.next_value::<Option<_>>()?.unwrap_or_default()
                        }
                        "observability" => {
                            c.observability = map.next_value::<Option<_>>()?.unwrap_or_default()
                        }
                        "managed_namespaces" => {
                            // `managed_namespaces:` with no value turns it on with defaults.
                            let v: Option<ManagedNamespaces> = map.next_value()?;
                            c.managed_namespaces = Some(v.unwrap_or_default());
                        }
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            c.ignored.push(key);
                        }
                    }
                }
                Ok(c)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Top-level sections of GitLab's agent configuration that kas does not implement, and
/// what they are for (named in the warning).
const GITLAB_SECTIONS: [(&str, &str); 8] = [
    ("gitops", "GitLab's GitOps manifest projects"),
    ("user_access", "GitLab user access to the cluster"),
    (
        "container_scanning",
        "GitLab's operational container scanning",
    ),
    ("starboard", "GitLab's (former) Starboard scanning"),
    (
        "remote_development",
        "GitLab's remote development workspaces",
    ),
    ("flux", "GitLab's Flux integration"),
    ("workspaces", "GitLab's remote development workspaces"),
    ("alerts", "GitLab alerts"),
];

/// The top-level sections kas implements: a key close to one of these is a misspelling.
const KAS_SECTIONS: [&str; 4] = [
    "ci_access",
    "service_access",
    "observability",
    "managed_namespaces",
];

/// `managed_namespaces`: when a CI job starts for project P in environment E, kas
/// ensures the namespace `<project-path-slug>-<project-id>-<environment-slug>` in the
/// agent's cluster, with a RoleBinding of `cluster_role` there to the group
/// `gitlab:project_env:<project id>:<environment slug>`, and makes it the namespace of
/// the job's kubeconfig. With `access_as: ci_job` a job can then change only its own
/// environment's namespace.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedNamespaces {
    /// The ClusterRole bound in each namespace.
    #[serde(default = "default_cluster_role")]
    pub cluster_role: String,
}

fn default_cluster_role() -> String {
    "admin".into()
}

impl Default for ManagedNamespaces {
    fn default() -> Self {
        ManagedNamespaces {
            cluster_role: default_cluster_role(),
        }
    }
}

/// A ClusterRole name kas can put in a RoleBinding and a URL path.
fn check_cluster_role(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a ClusterRole name (letters, digits, '-', '.', ':', '_'; at most 253)"
        ))
    }
}

/// `observability`: agentk's log levels, as GitLab's agent takes them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observability {
    #[serde(default)]
    pub logging: Logging,
    /// GitLab's Google Cloud Profiler settings: accepted, ignored (with a warning).
    #[serde(default)]
    pub google_profiler: Option<serde_yaml_ng::Value>,
}

/// `observability.logging`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    /// agentk's own log level: `debug`, `info`, `warn` or `error`.
    pub level: Option<String>,
    /// The log level of the gRPC and HTTP/2 libraries (GitLab's default: `error`).
    pub grpc_level: Option<String>,
}

/// Log levels GitLab's agent accepts.
pub const LOG_LEVELS: [&str; 4] = ["debug", "info", "warn", "error"];

/// Limits on `ci_access` entries (kas settings; GitLab allows 500 since 17.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CiAccessLimits {
    pub max_projects: usize,
    pub max_groups: usize,
}

impl Default for CiAccessLimits {
    fn default() -> Self {
        CiAccessLimits {
            max_projects: MAX_PROJECTS,
            max_groups: MAX_GROUPS,
        }
    }
}

/// Levenshtein distance, for "did you mean" on top-level keys.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
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
    /// Only jobs on protected branches (or tags) may use the agent through this entry.
    #[serde(default)]
    pub protected_branches_only: bool,
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
    /// Only jobs on protected branches (or tags) may use the agent through this entry.
    #[serde(default)]
    pub protected_branches_only: bool,
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
    /// A map (`{key: [values]}`) or GitLab's list form (`[{key: k, val: [values]}]`).
    #[serde(default, deserialize_with = "extra_map")]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// GitLab's form of one `impersonate.extra` entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtraKeyVal {
    key: String,
    #[serde(default)]
    val: Vec<String>,
}

/// Reads `impersonate.extra` as a map or as GitLab's list of `{key, val}`; values of a
/// key listed twice are joined.
fn extra_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Vec<String>>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = BTreeMap<String, Vec<String>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of keys to lists of values, or a list of {key, val}")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = m.next_entry::<String, Vec<String>>()? {
                out.insert(k, v);
            }
            Ok(out)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut s: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
            while let Some(e) = s.next_element::<ExtraKeyVal>()? {
                out.entry(e.key).or_default().extend(e.val);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Visitor)
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
/// `config_project_path`, with the default `ci_access` limits. Returns the
/// configuration and warnings (what kas ignores, entries that can never match).
pub fn parse_agent_config(
    yaml: &str,
    config_project_path: &str,
) -> Result<(AgentConfig, Vec<ConfigWarning>), ConfigError> {
    parse_agent_config_with(yaml, config_project_path, Some(&CiAccessLimits::default()))
}

/// [`parse_agent_config`] with `limits` on `ci_access` entries (`None`: not checked,
/// for a stored configuration that was validated when it was set).
pub fn parse_agent_config_with(
    yaml: &str,
    config_project_path: &str,
    limits: Option<&CiAccessLimits>,
) -> Result<(AgentConfig, Vec<ConfigWarning>), ConfigError> {
    let config = deserialize(yaml)?;
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let root = crate::root_of(config_project_path);
    check_sections(&config, &mut problems, &mut warnings);
    let ca = &config.ci_access;
    if let Some(l) = limits {
        check_limits(ca, l, &mut problems);
    }
    let entries = ca
        .projects
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let at = format!("ci_access.projects[{i}]");
            (
                at,
                &e.id,
                &e.default_namespace,
                &e.environments,
                &e.access_as,
            )
        })
        .chain(ca.groups.iter().enumerate().map(|(i, e)| {
            let at = format!("ci_access.groups[{i}]");
            (
                at,
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
    if let Some(m) = &config.managed_namespaces {
        if let Err(msg) = check_cluster_role(&m.cluster_role) {
            problems.push(problem("managed_namespaces.cluster_role", msg));
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
        check_entry_settings(
            &at,
            ns.as_deref(),
            envs.as_deref(),
            access_as,
            &mut problems,
        );
    }
    if problems.is_empty() {
        Ok((config, warnings))
    } else {
        Err(ConfigError { problems })
    }
}

/// The YAML itself, strictly: an unknown key or a wrong type names its path.
fn deserialize(yaml: &str) -> Result<AgentConfig, ConfigError> {
    if yaml.trim().is_empty() {
        return Ok(AgentConfig::default());
    }
    let de = serde_yaml_ng::Deserializer::from_str(yaml);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let message = e.into_inner().to_string();
        // The YAML error starts with the path (or its parent's); keep the path once.
        let message = match message.split_once(": ") {
            Some((prefix, rest))
                if field == prefix
                    || field.starts_with(&format!("{prefix}."))
                    || field.starts_with(&format!("{prefix}[")) =>
            {
                rest.to_string()
            }
            _ => message,
        };
        ConfigError {
            problems: vec![Problem {
                field: if field == "." { String::new() } else { field },
                message,
            }],
        }
    })
}

/// At most `limits` projects and groups under `ci_access`.
fn check_limits(ca: &CiAccess, l: &CiAccessLimits, problems: &mut Vec<Problem>) {
    if ca.projects.len() > l.max_projects {
        problems.push(problem(
            "ci_access.projects",
            format!(
                "at most {} projects are allowed (kas's agent.max_ci_access_projects), found {}",
                l.max_projects,
                ca.projects.len()
            ),
        ));
    }
    if ca.groups.len() > l.max_groups {
        problems.push(problem(
            "ci_access.groups",
            format!(
                "at most {} groups are allowed (kas's agent.max_ci_access_groups), found {}",
                l.max_groups,
                ca.groups.len()
            ),
        ));
    }
}

/// A `ci_access` entry's namespace, environments and `access_as` (at `at`).
fn check_entry_settings(
    at: &str,
    ns: Option<&str>,
    envs: Option<&[String]>,
    access_as: &AccessAs,
    problems: &mut Vec<Problem>,
) {
    if let Some(ns) = ns {
        if !is_dns_label(ns) {
            problems.push(problem(
                format!("{at}.default_namespace"),
                format!("`{ns}` is not a valid namespace name (lowercase letters, digits and '-', at most 63, starting and ending with a letter or digit)"),
            ));
        }
    }
    for (j, e) in envs.unwrap_or_default().iter().enumerate() {
        if e.trim().is_empty() {
            problems.push(problem(
                format!("{at}.environments[{j}]"),
                "must not be empty",
            ));
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

/// Warnings for what kas ignores, and problems for top-level keys that look like
/// misspellings of the sections kas implements; checks `observability`.
fn check_sections(config: &AgentConfig, problems: &mut Vec<Problem>, warnings: &mut Vec<Problem>) {
    for key in &config.ignored {
        if let Some((_, what)) = GITLAB_SECTIONS.iter().find(|(k, _)| k == key) {
            warnings.push(problem(
                key.as_str(),
                format!("kas does not implement {what}; this section is ignored"),
            ));
        } else if let Some(meant) = KAS_SECTIONS
            .iter()
            .find(|s| distance(&key.to_ascii_lowercase(), s) <= 2)
        {
            problems.push(problem(
                key.as_str(),
                format!("unknown section; did you mean `{meant}`?"),
            ));
        } else {
            warnings.push(problem(key.as_str(), "unknown section; kas ignores it"));
        }
    }
    let logging = &config.observability.logging;
    for (name, level) in [
        ("level", &logging.level),
        ("grpc_level", &logging.grpc_level),
    ] {
        if let Some(l) = level {
            if !LOG_LEVELS.contains(&l.as_str()) {
                problems.push(problem(
                    format!("observability.logging.{name}"),
                    format!("`{l}` is not a log level (use debug, info, warn or error)"),
                ));
            }
        }
    }
    if config.observability.google_profiler.is_some() {
        warnings.push(problem(
            "observability.google_profiler",
            "kas does not implement GitLab's Google Cloud Profiler settings; ignored",
        ));
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
    fn managed_namespaces_default_to_admin_and_refuse_bad_roles() {
        let parse = |yaml: &str| {
            parse_agent_config(yaml, "acme/platform/agents")
                .expect("valid")
                .0
                .managed_namespaces
        };
        assert_eq!(parse("ci_access: {}\n"), None);
        let admin = Some(ManagedNamespaces::default());
        assert_eq!(parse("managed_namespaces:\n"), admin);
        assert_eq!(parse("managed_namespaces: {}\n"), admin);
        assert_eq!(
            parse("managed_namespaces: {cluster_role: edit}\n").map(|m| m.cluster_role),
            Some("edit".to_string())
        );
        assert!(err("managed_namespaces: {cluster_role: a/b}\n")
            .contains("managed_namespaces.cluster_role"));
        assert!(err("managed_namespaces: {role: edit}\n").contains("unknown field `role`"));
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

    #[test]
    fn gitlab_configurations_are_accepted_with_warnings() {
        let yaml = r#"
gitops:
  manifest_projects:
    - id: acme/manifests
      paths: [{glob: '/**/*.yaml'}]
observability:
  logging:
    level: debug
    grpc_level: warn
user_access:
  access_as: {agent: {}}
  projects: [{id: acme/web/shop}]
container_scanning:
  cadence: '0 0 * * *'
remote_development:
  enabled: true
flux:
  webhook_receiver_url: http://webhook-receiver.flux-system.svc.cluster.local
something_gitlab_adds_later:
  enabled: true
ci_access:
  projects:
    - id: acme/web/shop
      protected_branches_only: true
      environments: [production]
      access_as:
        impersonate:
          username: deployer
          extra:
            - key: team
              val: [web, ops]
            - key: reason
              val: [deploy]
"#;
        let (c, w) = parse_agent_config(yaml, "acme/platform/agents").expect("valid");
        let warned: Vec<&str> = w.iter().map(|p| p.field.as_str()).collect();
        for k in [
            "gitops",
            "user_access",
            "container_scanning",
            "remote_development",
            "flux",
            "something_gitlab_adds_later",
        ] {
            assert!(warned.contains(&k), "no warning for {k}: {warned:?}");
        }
        assert_eq!(c.observability.logging.level.as_deref(), Some("debug"));
        assert_eq!(c.observability.logging.grpc_level.as_deref(), Some("warn"));
        assert!(c.ci_access.projects[0].protected_branches_only);
        match &c.ci_access.projects[0].access_as {
            AccessAs::Impersonate(i) => {
                assert_eq!(i.extra["team"], ["web", "ops"]);
                assert_eq!(i.extra["reason"], ["deploy"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn implemented_sections_stay_strict() {
        let e = err("ci_access:\n  project:\n    - id: acme/x\n");
        assert!(e.contains("ci_access") && e.contains("project"), "{e}");
        let e = err("service_access:\n  - url: http://x:1/\n    urls: y\n");
        assert!(e.contains("service_access[0]") && e.contains("urls"), "{e}");
        let e = err("observability:\n  logging:\n    levle: debug\n");
        assert!(
            e.contains("observability.logging") && e.contains("levle"),
            "{e}"
        );
        let e = err("observability:\n  logging:\n    level: verbose\n");
        assert!(e.contains("observability.logging.level"), "{e}");
        let e = err("servce_access: []\n");
        assert!(e.contains("did you mean `service_access`"), "{e}");
        let e = err("ci_access:\n  projects:\n    - id: acme/x\n      access_as:\n        impersonate:\n          username: u\n          extra: [{key: k, vals: [v]}]\n");
        assert!(e.contains("extra") && e.contains("vals"), "{e}");
        let e = err("ci_access: {}\nci_access: {}\n");
        assert!(e.contains("twice") || e.contains("duplicate"), "{e}");
    }

    #[test]
    fn limits_are_settings() {
        let mut yaml = String::from("ci_access:\n  projects:\n");
        for i in 0..150 {
            yaml.push_str(&format!("    - id: acme/p{i}\n"));
        }
        let e = err(&yaml);
        assert!(
            e.contains("at most 100 projects") && e.contains("max_ci_access_projects"),
            "{e}"
        );
        let raised = CiAccessLimits {
            max_projects: 500,
            max_groups: 500,
        };
        assert!(parse_agent_config_with(&yaml, "acme/a", Some(&raised)).is_ok());
        assert!(parse_agent_config_with(&yaml, "acme/a", None).is_ok());
    }
}
