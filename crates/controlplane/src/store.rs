//! The control plane's logic over SQL, shared by the SQLite and PostgreSQL backends so
//! both behave the same. Every operation is one transaction on the blocking pool.

use crate::sql::{conflict, Backend, Row, Tx, TxExt, Val};
use crate::token::{hash_token, new_token, Secret, TokenKind};
use crate::{agent_tokens, apps, eks};
use crate::{
    slug, Agent, AgentAuth, AgentInfo, AgentToken, AppOutcome, Change, ClusterApp, ControlPlane,
    EnvironmentRecord, Error, Group, Job, JobStatus, Project, Result, StartAppOperation, StartJob,
};
use crate::{EksCluster, EksSpec, EksWork};
use async_trait::async_trait;
use kas_authz::{AgentRef, Environment, JobContext, Named};
use std::sync::Arc;
use tokio::sync::{broadcast, Semaphore};

/// A control plane on a SQL database. Cloning shares the database.
pub struct SqlControlPlane<B> {
    db: Arc<B>,
    /// One permit per transaction that can run at once: callers beyond that wait here,
    /// not in a blocking thread each (a thousand agents reconnecting at once had made
    /// the blocking pool grow to its 512 threads, each with its allocator cache).
    slots: Arc<Semaphore>,
}

impl<B> Clone for SqlControlPlane<B> {
    fn clone(&self) -> Self {
        SqlControlPlane {
            db: self.db.clone(),
            slots: self.slots.clone(),
        }
    }
}

fn now() -> i64 {
    i64::try_from(kas_api::clock::unix_secs()).unwrap_or(i64::MAX)
}

fn validate_path(kind: &str, path: &str) -> Result<String> {
    let p = path.trim().trim_matches('/');
    if p.is_empty() {
        return Err(Error::Invalid(format!("{kind} path must not be empty")));
    }
    for seg in p.split('/') {
        if seg.is_empty()
            || seg.starts_with(['-', '.'])
            || !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(Error::Invalid(format!(
                "{kind} path `{path}` is invalid: each segment may hold only letters, digits, '_', '-' and '.', and must not start with '-' or '.'"
            )));
        }
    }
    if p.len() > 255 {
        return Err(Error::Invalid(format!(
            "{kind} path is longer than 255 characters"
        )));
    }
    Ok(p.to_string())
}

fn validate_agent_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "agent name `{name}` is invalid: use lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit"
        )))
    }
}

pub(crate) fn to_i64(kind: &str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Invalid(format!("{kind} id {v} is too large")))
}

// `Backend` is deliberately crate-private: the two backends are the only ones.
#[allow(private_bounds)]
impl<B: Backend> SqlControlPlane<B> {
    pub(crate) fn with_backend(db: B) -> Self {
        let slots = Arc::new(Semaphore::new(db.concurrency().max(1)));
        SqlControlPlane {
            db: Arc::new(db),
            slots,
        }
    }

    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| Error::Storage(Box::new(e)))?;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            db.transaction(f)
        })
        .await
        .map_err(|e| Error::Storage(Box::new(e)))?
    }
}

// Paths compare case-insensitively, like GitLab's.
const GROUP_BY_PATH: &str = "SELECT id, parent_id, path FROM groups WHERE lower(path) = lower($1)";
const PROJECT_BY_PATH: &str =
    "SELECT id, group_id, path FROM projects WHERE lower(path) = lower($1)";

/// Creates every missing group along `path` (like `mkdir -p`); returns the last one.
/// `last_id` asks for an explicit id for the last group if it has to be created.
fn ensure_groups(tx: &mut dyn Tx, path: &str, last_id: Option<u64>) -> Result<Group> {
    let segs: Vec<&str> = path.split('/').collect();
    let mut parent: Option<u64> = None;
    let mut current = None;
    for i in 1..=segs.len() {
        let p = segs[..i].join("/");
        let g = match tx.query_opt(GROUP_BY_PATH, &[(&p).into()])? {
            Some(r) => group_row(&r)?,
            None => {
                if tx.exists(PROJECT_BY_PATH, &[(&p).into()])? {
                    return Err(Error::AlreadyExists(format!(
                        "`{p}` is a project, not a group"
                    )));
                }
                let explicit = if i == segs.len() { last_id } else { None };
                let parent_i = parent.map(|v| to_i64("group", v)).transpose()?;
                let id = match explicit {
                    Some(id) => {
                        let row = tx
                            .query(
                                "INSERT INTO groups (id, parent_id, path) VALUES ($1, $2, $3) RETURNING id",
                                &[to_i64("group", id)?.into(), parent_i.into(), (&p).into()],
                            )
                            .map_err(conflict(|| format!("group id {id} is taken")))?;
                        tx.explicit_id_inserted("groups")?;
                        row
                    }
                    None => tx
                        .query(
                            "INSERT INTO groups (parent_id, path) VALUES ($1, $2) RETURNING id",
                            &[parent_i.into(), (&p).into()],
                        )
                        .map_err(conflict(|| format!("group `{p}` already exists")))?,
                };
                let id = returned_id(&id)?;
                Group {
                    id,
                    parent_id: parent,
                    path: p,
                }
            }
        };
        parent = Some(g.id);
        current = Some(g);
    }
    current.ok_or_else(|| Error::Invalid("empty group path".into()))
}

fn returned_id(rows: &[Row]) -> Result<u64> {
    rows.first()
        .ok_or_else(|| Error::Storage("INSERT returned no id".into()))?
        .id(0)
}

fn all<T>(
    tx: &mut dyn Tx,
    sql: &str,
    params: &[Val],
    map: impl Fn(&Row) -> Result<T>,
) -> Result<Vec<T>> {
    tx.query(sql, params)?.iter().map(map).collect()
}

fn group_row(r: &Row) -> Result<Group> {
    Ok(Group {
        id: r.id(0)?,
        parent_id: r.opt_id(1)?,
        path: r.text(2)?,
    })
}

fn project_row(r: &Row) -> Result<Project> {
    Ok(Project {
        id: r.id(0)?,
        group_id: r.id(1)?,
        path: r.text(2)?,
    })
}

const AGENT_COLS: &str =
    "a.id, a.name, a.project_id, p.path, a.config_version, a.created_at, a.config_yaml";
const AGENT_FROM: &str = "FROM agents a JOIN projects p ON p.id = a.project_id";

/// The agent matching `condition` (on `a`, the agents table) with its stored config.
fn agent_where(
    tx: &mut dyn Tx,
    condition: &str,
    params: &[Val],
) -> Result<Option<(Agent, String)>> {
    tx.query_opt(
        &format!("SELECT {AGENT_COLS} {AGENT_FROM} WHERE {condition}"),
        params,
    )?
    .as_ref()
    .map(agent_row)
    .transpose()
}

fn project_by_path(tx: &mut dyn Tx, path: &str) -> Result<Project> {
    let p = path.trim().trim_matches('/');
    tx.query_opt(PROJECT_BY_PATH, &[p.into()])?
        .as_ref()
        .map(project_row)
        .transpose()?
        .ok_or_else(|| Error::NotFound(format!("project `{path}` not found")))
}

fn agent_row(r: &Row) -> Result<(Agent, String)> {
    Ok((
        Agent {
            id: r.id(0)?,
            name: r.text(1)?,
            project_id: r.id(2)?,
            project_path: r.text(3)?,
            config_version: r.id(4)?,
            created_at: r.int(5)?,
        },
        r.text(6)?,
    ))
}

fn agent_info(agent: Agent, yaml: String) -> Result<AgentInfo> {
    // Stored configurations were validated on set; a parse failure here means the
    // stored row is corrupt, which is a storage error, not the caller's.
    let (config, _) = kas_authz::parse_agent_config_with(&yaml, &agent.project_path, None)
        .map_err(|e| Error::Storage(Box::new(e)))?;
    Ok(AgentInfo {
        agent: AgentRef {
            id: agent.id,
            name: agent.name,
            config_project: Named {
                id: agent.project_id,
                path: agent.project_path,
            },
        },
        config,
        config_yaml: yaml,
        config_version: agent.config_version,
    })
}

fn agent_infos(rows: Vec<(Agent, String)>) -> Result<Vec<Arc<AgentInfo>>> {
    rows.into_iter()
        .map(|(a, y)| agent_info(a, y).map(Arc::new))
        .collect()
}

const JOB_COLS: &str = "j.id, j.project_id, p.path, j.pipeline_id, e.name, j.username, j.status, j.started_at, j.finished_at, j.protected_ref";
const JOB_FROM: &str = "FROM jobs j JOIN projects p ON p.id = j.project_id LEFT JOIN environments e ON e.id = j.environment_id";

fn job_row(r: &Row) -> Result<Job> {
    Ok(Job {
        id: r.id(0)?,
        project_id: r.id(1)?,
        project_path: r.text(2)?,
        pipeline_id: r.id(3)?,
        environment: r.opt_text(4)?,
        username: r.text(5)?,
        status: JobStatus::parse(&r.text(6)?).unwrap_or(JobStatus::Failed),
        started_at: r.int(7)?,
        finished_at: r.opt_int(8)?,
        protected_ref: r.int(9)? != 0,
    })
}

fn job_by_id(tx: &mut dyn Tx, id: i64) -> Result<Option<Job>> {
    tx.query_opt(
        &format!("SELECT {JOB_COLS} {JOB_FROM} WHERE j.id = $1"),
        &[id.into()],
    )?
    .as_ref()
    .map(job_row)
    .transpose()
}

fn group_chain(tx: &mut dyn Tx, mut group_id: Option<u64>) -> Result<Vec<Named>> {
    let mut chain = Vec::new();
    while let Some(id) = group_id {
        let r = tx.query_one(
            "SELECT path, parent_id FROM groups WHERE id = $1",
            &[to_i64("group", id)?.into()],
        )?;
        chain.push(Named {
            id,
            path: r.text(0)?,
        });
        group_id = r.opt_id(1)?;
        if chain.len() > 64 {
            return Err(Error::Storage("group hierarchy is cyclic".into()));
        }
    }
    chain.reverse();
    Ok(chain)
}

#[allow(private_bounds)]
#[async_trait]
impl<B: Backend> ControlPlane for SqlControlPlane<B> {
    async fn create_group(&self, path: &str, id: Option<u64>) -> Result<Group> {
        let path = validate_path("group", path)?;
        self.run(move |tx| {
            if id.is_some() && tx.exists(GROUP_BY_PATH, &[(&path).into()])? {
                return Err(Error::AlreadyExists(format!(
                    "group `{path}` already exists"
                )));
            }
            ensure_groups(tx, &path, id)
        })
        .await
    }

    async fn list_groups(&self) -> Result<Vec<Group>> {
        self.run(|tx| {
            all(
                tx,
                "SELECT id, parent_id, path FROM groups ORDER BY path",
                &[],
                group_row,
            )
        })
        .await
    }

    async fn create_project(&self, path: &str, id: Option<u64>) -> Result<Project> {
        let path = validate_path("project", path)?;
        let Some((parent, _)) = path.rsplit_once('/') else {
            return Err(Error::Invalid(format!(
                "project path `{path}` must be inside a group, like `group/{path}`"
            )));
        };
        let parent = parent.to_string();
        self.run(move |tx| {
            if tx.exists(GROUP_BY_PATH, &[(&path).into()])? {
                return Err(Error::AlreadyExists(format!("`{path}` is a group")));
            }
            let g = ensure_groups(tx, &parent, None)?;
            let gid = to_i64("group", g.id)?;
            let exists = || format!("project `{path}` (or its id) already exists");
            let rows = match id {
                Some(id) => {
                    let rows = tx
                        .query(
                            "INSERT INTO projects (id, group_id, path) VALUES ($1, $2, $3) RETURNING id",
                            &[to_i64("project", id)?.into(), gid.into(), (&path).into()],
                        )
                        .map_err(conflict(exists))?;
                    tx.explicit_id_inserted("projects")?;
                    rows
                }
                None => tx
                    .query(
                        "INSERT INTO projects (group_id, path) VALUES ($1, $2) RETURNING id",
                        &[gid.into(), (&path).into()],
                    )
                    .map_err(conflict(exists))?,
            };
            Ok(Project {
                id: returned_id(&rows)?,
                group_id: g.id,
                path,
            })
        })
        .await
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        self.run(|tx| {
            all(
                tx,
                "SELECT id, group_id, path FROM projects ORDER BY path",
                &[],
                project_row,
            )
        })
        .await
    }

    async fn create_agent(&self, project: &str, name: &str) -> Result<(Agent, Secret)> {
        validate_agent_name(name)?;
        let (project, name) = (project.to_string(), name.to_string());
        self.run(move |tx| {
            let p = project_by_path(tx, &project)?;
            let token = new_token(TokenKind::Agent);
            let created_at = now();
            let rows = tx
                .query(
                    "INSERT INTO agents (project_id, name, token_hash, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
                    &[
                        to_i64("project", p.id)?.into(),
                        (&name).into(),
                        hash_token(token.expose()).to_vec().into(),
                        created_at.into(),
                    ],
                )
                .map_err(conflict(|| {
                    format!("agent `{name}` already exists in project `{}`", p.path)
                }))?;
            let id = returned_id(&rows)?;
            agent_tokens::insert(tx, to_i64("agent", id)?, "default", &token, created_at)?;
            Ok((
                Agent {
                    id,
                    name,
                    project_id: p.id,
                    project_path: p.path,
                    config_version: 0,
                    created_at,
                },
                token,
            ))
        })
        .await
    }

    async fn list_agents(&self) -> Result<Vec<Agent>> {
        self.run(|tx| {
            let rows = all(
                tx,
                &format!("SELECT {AGENT_COLS} {AGENT_FROM} ORDER BY a.id"),
                &[],
                agent_row,
            )?;
            Ok(rows.into_iter().map(|(a, _)| a).collect())
        })
        .await
    }

    async fn delete_agent(&self, agent_id: u64) -> Result<Agent> {
        let id = to_i64("agent", agent_id)?;
        self.run(move |tx| {
            let (agent, _) = agent_where(tx, "a.id = $1", &[id.into()])?
                .ok_or_else(|| Error::NotFound(format!("agent {agent_id} not found")))?;
            agent_tokens::delete_all(tx, id)?;
            apps::delete_all(tx, id)?;
            tx.execute("DELETE FROM agents WHERE id = $1", &[id.into()])?;
            tx.announce(Change::AgentDeleted { agent_id })?;
            Ok(agent)
        })
        .await
    }

    async fn create_agent_token(
        &self,
        agent_id: u64,
        name: Option<&str>,
    ) -> Result<(AgentToken, Secret)> {
        let id = to_i64("agent", agent_id)?;
        let name = name.map(str::to_string);
        self.run(move |tx| agent_tokens::create(tx, id, name.as_deref(), now()))
            .await
    }

    async fn list_agent_tokens(&self, agent_id: u64) -> Result<Vec<AgentToken>> {
        let id = to_i64("agent", agent_id)?;
        self.run(move |tx| agent_tokens::list(tx, id)).await
    }

    async fn revoke_agent_token(&self, agent_id: u64, token: &str) -> Result<AgentToken> {
        let id = to_i64("agent", agent_id)?;
        let token = token.to_string();
        self.run(move |tx| agent_tokens::revoke(tx, id, &token, now()))
            .await
    }

    async fn touch_agent_token(&self, token_id: u64) -> Result<()> {
        let id = to_i64("token", token_id)?;
        self.run(move |tx| agent_tokens::touch(tx, id, now())).await
    }

    async fn get_agent(&self, project: &str, name: &str) -> Result<Agent> {
        let (project, name) = (project.to_string(), name.to_string());
        self.run(move |tx| {
            let p = project_by_path(tx, &project)?;
            agent_where(
                tx,
                "a.project_id = $1 AND a.name = $2",
                &[to_i64("project", p.id)?.into(), (&name).into()],
            )?
            .map(|(a, _)| a)
            .ok_or_else(|| {
                Error::NotFound(format!("agent `{name}` not found in project `{}`", p.path))
            })
        })
        .await
    }

    async fn set_agent_config(
        &self,
        project: &str,
        name: &str,
        yaml: &str,
        limits: &kas_authz::CiAccessLimits,
    ) -> Result<(u64, Vec<kas_authz::ConfigWarning>)> {
        let agent = self.get_agent(project, name).await?;
        let (_, warnings) =
            kas_authz::parse_agent_config_with(yaml, &agent.project_path, Some(limits))?;
        let yaml = yaml.to_string();
        let id = agent.id;
        let version = self
            .run(move |tx| {
                let r = tx.query_one(
                    "UPDATE agents SET config_yaml = $1, config_version = config_version + 1 WHERE id = $2 RETURNING config_version",
                    &[(&yaml).into(), to_i64("agent", id)?.into()],
                )?;
                tx.announce(Change::AgentConfig { agent_id: id })?;
                r.id(0)
            })
            .await?;
        Ok((version, warnings))
    }

    async fn create_environment(
        &self,
        project: &str,
        name: &str,
        tier: Option<&str>,
    ) -> Result<EnvironmentRecord> {
        let name = name.trim().to_string();
        if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
            return Err(Error::Invalid(format!(
                "environment name `{name}` is invalid: it must be 1 to 255 printable characters"
            )));
        }
        let tier = match tier {
            Some(t) if crate::TIERS.contains(&t) => t.to_string(),
            Some(t) => {
                return Err(Error::Invalid(format!(
                    "tier `{t}` is invalid: use one of {}",
                    crate::TIERS.join(", ")
                )))
            }
            None => slug::guess_tier(&name).to_string(),
        };
        let slug = slug::environment_slug(&name);
        let project = project.to_string();
        self.run(move |tx| {
            let p = project_by_path(tx, &project)?;
            let rows = tx
                .query(
                    "INSERT INTO environments (project_id, name, slug, tier) VALUES ($1, $2, $3, $4) RETURNING id",
                    &[to_i64("project", p.id)?.into(), (&name).into(), (&slug).into(), (&tier).into()],
                )
                .map_err(conflict(|| {
                    format!("environment `{name}` already exists in `{}`", p.path)
                }))?;
            Ok(EnvironmentRecord {
                id: returned_id(&rows)?,
                project_id: p.id,
                project_path: p.path,
                name,
                slug,
                tier,
            })
        })
        .await
    }

    async fn list_environments(&self, project: Option<&str>) -> Result<Vec<EnvironmentRecord>> {
        let project = project.map(str::to_string);
        self.run(move |tx| {
            let pid = match &project {
                Some(p) => Some(to_i64("project", project_by_path(tx, p)?.id)?),
                None => None,
            };
            all(
                tx,
                "SELECT e.id, e.project_id, p.path, e.name, e.slug, e.tier FROM environments e \
                 JOIN projects p ON p.id = e.project_id WHERE CAST($1 AS BIGINT) IS NULL OR e.project_id = $1 \
                 ORDER BY p.path, e.name",
                &[pid.into()],
                |r| {
                    Ok(EnvironmentRecord {
                        id: r.id(0)?,
                        project_id: r.id(1)?,
                        project_path: r.text(2)?,
                        name: r.text(3)?,
                        slug: r.text(4)?,
                        tier: r.text(5)?,
                    })
                },
            )
        })
        .await
    }

    async fn start_job(&self, req: &StartJob) -> Result<(Job, Secret)> {
        let req = req.clone();
        if req.username.trim().is_empty() {
            return Err(Error::Invalid("the job's user must not be empty".into()));
        }
        self.run(move |tx| {
            let p = project_by_path(tx, &req.project)?;
            let pid = to_i64("project", p.id)?;
            let env_id: Option<i64> = match &req.environment {
                Some(name) => Some(
                    tx.query_opt(
                        "SELECT id FROM environments WHERE project_id = $1 AND name = $2",
                        &[pid.into(), name.into()],
                    )?
                    .ok_or_else(|| {
                        Error::NotFound(format!(
                            "environment `{name}` not found in project `{}` (create it with `kasctl environment create`)",
                            p.path
                        ))
                    })?
                    .int(0)?,
                ),
                None => None,
            };
            let pipeline_id = match req.pipeline_id {
                Some(v) => to_i64("pipeline", v)?,
                None => tx
                    .query_one("SELECT COALESCE(MAX(pipeline_id), 0) + 1 FROM jobs", &[])?
                    .int(0)?,
            };
            let token = new_token(TokenKind::Job);
            let rows = tx.query(
                "INSERT INTO jobs (project_id, pipeline_id, environment_id, username, token_hash, status, started_at, protected_ref) \
                 VALUES ($1, $2, $3, $4, $5, 'running', $6, $7) RETURNING id",
                &[
                    pid.into(),
                    pipeline_id.into(),
                    env_id.into(),
                    (&req.username).into(),
                    hash_token(token.expose()).to_vec().into(),
                    now().into(),
                    i64::from(req.protected_ref).into(),
                ],
            )?;
            let id = to_i64("job", returned_id(&rows)?)?;
            let job = job_by_id(tx, id)?
                .ok_or_else(|| Error::Storage("the new job disappeared".into()))?;
            Ok((job, token))
        })
        .await
    }

    async fn finish_job(&self, id: u64, status: JobStatus) -> Result<Job> {
        if status == JobStatus::Running {
            return Err(Error::Invalid(
                "a finished job's status cannot be `running`".into(),
            ));
        }
        self.run(move |tx| {
            let idi = to_i64("job", id)?;
            let n = tx.execute(
                "UPDATE jobs SET status = $1, finished_at = $2 WHERE id = $3 AND status = 'running'",
                &[status.as_str().into(), now().into(), idi.into()],
            )?;
            let job =
                job_by_id(tx, idi)?.ok_or_else(|| Error::NotFound(format!("job {id} not found")))?;
            if n == 0 {
                return Err(Error::Invalid(format!(
                    "job {id} already finished ({})",
                    job.status.as_str()
                )));
            }
            tx.announce(Change::JobFinished { job_id: id })?;
            Ok(job)
        })
        .await
    }

    async fn list_jobs(&self) -> Result<Vec<Job>> {
        self.run(|tx| {
            all(
                tx,
                &format!("SELECT {JOB_COLS} {JOB_FROM} ORDER BY j.id"),
                &[],
                job_row,
            )
        })
        .await
    }

    async fn authenticate_agent(&self, token: &str) -> Result<Option<Arc<AgentAuth>>> {
        let h = hash_token(token).to_vec();
        self.run(move |tx| {
            let Some((token_id, agent_id)) = agent_tokens::active_by_hash(tx, h)? else {
                return Ok(None);
            };
            let row = agent_where(tx, "a.id = $1", &[to_i64("agent", agent_id)?.into()])?;
            row.map(|(a, y)| {
                Ok(Arc::new(AgentAuth {
                    token_id,
                    info: Arc::new(agent_info(a, y)?),
                }))
            })
            .transpose()
        })
        .await
    }

    async fn agent_info(&self, agent_id: u64) -> Result<Option<Arc<AgentInfo>>> {
        let Ok(id) = i64::try_from(agent_id) else {
            return Ok(None);
        };
        self.run(move |tx| {
            let row = agent_where(tx, "a.id = $1", &[id.into()])?;
            row.map(|(a, y)| agent_info(a, y).map(Arc::new)).transpose()
        })
        .await
    }

    async fn all_agent_infos(&self) -> Result<Vec<Arc<AgentInfo>>> {
        self.run(|tx| {
            agent_infos(all(
                tx,
                &format!("SELECT {AGENT_COLS} {AGENT_FROM} ORDER BY p.path, a.name"),
                &[],
                agent_row,
            )?)
        })
        .await
    }

    async fn authenticate_job(&self, token: &str) -> Result<Option<Arc<JobContext>>> {
        let h = hash_token(token).to_vec();
        self.run(move |tx| {
            let Some(r) = tx.query_opt(
                "SELECT j.id, j.project_id, j.pipeline_id, j.username, e.name, e.slug, e.tier, p.path, p.group_id, j.protected_ref \
                 FROM jobs j JOIN projects p ON p.id = j.project_id LEFT JOIN environments e ON e.id = j.environment_id \
                 WHERE j.token_hash = $1 AND j.status = 'running'",
                &[h.into()],
            )?
            else {
                return Ok(None);
            };
            let environment = match r.opt_text(4)? {
                Some(name) => Some(Environment {
                    name,
                    slug: r.text(5)?,
                    tier: r.text(6)?,
                }),
                None => None,
            };
            let groups = group_chain(tx, Some(r.id(8)?))?;
            Ok(Some(Arc::new(JobContext {
                job_id: r.id(0)?,
                pipeline_id: r.id(2)?,
                project: Named {
                    id: r.id(1)?,
                    path: r.text(7)?,
                },
                groups,
                environment,
                username: r.text(3)?,
                protected_ref: r.int(9)? != 0,
            })))
        })
        .await
    }

    async fn job_context(&self, project: &str, environment: Option<&str>) -> Result<JobContext> {
        let (project, environment) = (project.to_string(), environment.map(str::to_string));
        self.run(move |tx| {
            let p = project_by_path(tx, &project)?;
            let environment = match environment {
                None => None,
                Some(name) => {
                    let r = tx
                        .query_opt(
                            "SELECT slug, tier FROM environments WHERE project_id = $1 AND name = $2",
                            &[to_i64("project", p.id)?.into(), (&name).into()],
                        )?
                        .ok_or_else(|| {
                            Error::NotFound(format!(
                                "environment `{name}` not found in `{}`",
                                p.path
                            ))
                        })?;
                    Some(Environment {
                        name,
                        slug: r.text(0)?,
                        tier: r.text(1)?,
                    })
                }
            };
            Ok(JobContext {
                job_id: 0,
                pipeline_id: 0,
                groups: group_chain(tx, Some(p.group_id))?,
                project: Named {
                    id: p.id,
                    path: p.path,
                },
                environment,
                username: String::new(),
                protected_ref: false,
            })
        })
        .await
    }

    async fn begin_app_operation(&self, op: &StartAppOperation) -> Result<ClusterApp> {
        let op = op.clone();
        self.run(move |tx| apps::begin(tx, &op, now())).await
    }

    async fn finish_app_operation(
        &self,
        agent_id: u64,
        name: &str,
        outcome: &AppOutcome,
    ) -> Result<ClusterApp> {
        let id = to_i64("agent", agent_id)?;
        let (name, outcome) = (name.to_string(), outcome.clone());
        self.run(move |tx| apps::finish(tx, id, &name, &outcome, now()))
            .await
    }

    async fn renew_app_lease(
        &self,
        agent_id: u64,
        name: &str,
        owner: &str,
        until: i64,
    ) -> Result<bool> {
        let id = to_i64("agent", agent_id)?;
        let (name, owner) = (name.to_string(), owner.to_string());
        self.run(move |tx| apps::renew(tx, id, &name, &owner, until))
            .await
    }

    async fn claim_app_operations(&self, owner: &str, until: i64) -> Result<Vec<ClusterApp>> {
        let owner = owner.to_string();
        self.run(move |tx| apps::claim(tx, &owner, now(), until))
            .await
    }

    async fn list_apps(&self, agent_id: Option<u64>) -> Result<Vec<ClusterApp>> {
        let id = agent_id.map(|a| to_i64("agent", a)).transpose()?;
        self.run(move |tx| apps::list(tx, id)).await
    }

    async fn prepare_eks(&self, name: &str, project: &str) -> Result<EksCluster> {
        let (name, project) = (name.to_string(), project.to_string());
        // Not a secret (it is in the trust policy), but unguessable per cluster.
        let external_id = format!("kas-{:032x}", rand::random::<u128>());
        self.run(move |tx| {
            let p = project_by_path(tx, &project)?;
            let id = to_i64("project", p.id)?;
            eks::prepare(tx, &name, id, &external_id, now())
        })
        .await
    }

    async fn request_eks(
        &self,
        name: &str,
        spec: &EksSpec,
        owner: &str,
        lease_until: i64,
    ) -> Result<EksWork> {
        let (name, spec, owner) = (name.to_string(), spec.clone(), owner.to_string());
        self.run(move |tx| eks::request(tx, &name, &spec, (&owner, lease_until), now()))
            .await
    }

    async fn delete_eks(&self, name: &str, owner: &str, lease_until: i64) -> Result<EksWork> {
        let (name, owner) = (name.to_string(), owner.to_string());
        self.run(move |tx| eks::delete(tx, &name, (&owner, lease_until), now()))
            .await
    }

    async fn save_eks(&self, owner: &str, work: &EksWork, lease_until: i64) -> Result<bool> {
        let (owner, work) = (owner.to_string(), work.clone());
        self.run(move |tx| eks::save(tx, &owner, &work, lease_until, now()))
            .await
    }

    async fn claim_eks(&self, owner: &str, until: i64) -> Result<Vec<EksWork>> {
        let owner = owner.to_string();
        self.run(move |tx| eks::claim(tx, &owner, now(), until))
            .await
    }

    async fn get_eks(&self, name: &str) -> Result<EksCluster> {
        let name = name.to_string();
        self.run(move |tx| eks::get(tx, &name)).await
    }

    async fn list_eks(&self) -> Result<Vec<EksCluster>> {
        self.run(eks::list).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.db.subscribe()
    }
}
