//! The embedded control plane: one SQLite file, one connection behind a mutex, queries
//! run on the blocking pool. Single kas only (several kas replicas share PostgreSQL).

use crate::token::{hash_token, new_token, Secret, TokenKind};
use crate::{
    slug, Agent, AgentInfo, Change, ControlPlane, EnvironmentRecord, Error, Group, Job, JobStatus,
    Project, Result, StartJob,
};
use async_trait::async_trait;
use kas_authz::{AgentRef, Environment, JobContext, Named};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS groups (
    id INTEGER PRIMARY KEY,
    parent_id INTEGER REFERENCES groups(id),
    path TEXT NOT NULL UNIQUE COLLATE NOCASE
);
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY,
    group_id INTEGER NOT NULL REFERENCES groups(id),
    path TEXT NOT NULL UNIQUE COLLATE NOCASE
);
CREATE TABLE IF NOT EXISTS agents (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    config_yaml TEXT NOT NULL DEFAULT '',
    config_version INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    UNIQUE (project_id, name)
);
CREATE TABLE IF NOT EXISTS environments (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    slug TEXT NOT NULL,
    tier TEXT NOT NULL,
    UNIQUE (project_id, name)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    pipeline_id INTEGER NOT NULL,
    environment_id INTEGER REFERENCES environments(id),
    username TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    status TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    finished_at INTEGER
);
"#;

/// The embedded control plane. Cloning shares the connection.
#[derive(Clone)]
pub struct SqliteControlPlane {
    conn: Arc<Mutex<Connection>>,
    changes: broadcast::Sender<Change>,
}

fn storage(e: rusqlite::Error) -> Error {
    Error::Storage(Box::new(e))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
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

fn id_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(kind: &str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Invalid(format!("{kind} id {v} is too large")))
}

impl SqliteControlPlane {
    /// Opens (creating if needed) the database file and applies the schema.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(storage)?;
        Self::init(conn)
    }

    /// An in-memory database, for tests.
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory().map_err(storage)?)
    }

    fn init(conn: Connection) -> Result<Self> {
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;",
        )
        .map_err(storage)?;
        conn.execute_batch(SCHEMA).map_err(storage)?;
        let (changes, _) = broadcast::channel(1024);
        Ok(SqliteControlPlane {
            conn: Arc::new(Mutex::new(conn)),
            changes,
        })
    }

    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| Error::Storage("control plane connection lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| Error::Storage(Box::new(e)))?
    }

    fn notify(&self, c: Change) {
        // No receivers is fine: nothing caches yet.
        let _ = self.changes.send(c);
    }
}

/// Creates every missing group along `path` (like `mkdir -p`); returns the last one.
/// `last_id` asks for an explicit id for the last group if it has to be created.
fn ensure_groups(tx: &Connection, path: &str, last_id: Option<u64>) -> Result<Group> {
    let segs: Vec<&str> = path.split('/').collect();
    let mut parent: Option<u64> = None;
    let mut current = None;
    for i in 1..=segs.len() {
        let p = segs[..i].join("/");
        let found = tx
            .query_row(
                "SELECT id, parent_id, path FROM groups WHERE path = ?1",
                params![p],
                group_row,
            )
            .optional()
            .map_err(storage)?;
        let g = match found {
            Some(g) => g,
            None => {
                if tx
                    .query_row("SELECT 1 FROM projects WHERE path = ?1", params![p], |_| {
                        Ok(())
                    })
                    .optional()
                    .map_err(storage)?
                    .is_some()
                {
                    return Err(Error::AlreadyExists(format!(
                        "`{p}` is a project, not a group"
                    )));
                }
                let explicit = if i == segs.len() { last_id } else { None };
                let parent_i = parent.map(|v| to_i64("group", v)).transpose()?;
                match explicit {
                    Some(id) => {
                        tx.execute(
                            "INSERT INTO groups (id, parent_id, path) VALUES (?1, ?2, ?3)",
                            params![to_i64("group", id)?, parent_i, p],
                        )
                        .map_err(|e| conflict(e, format!("group id {id} is taken")))?;
                    }
                    None => {
                        tx.execute(
                            "INSERT INTO groups (parent_id, path) VALUES (?1, ?2)",
                            params![parent_i, p],
                        )
                        .map_err(storage)?;
                    }
                }
                Group {
                    id: id_u64(tx.last_insert_rowid()),
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

fn conflict(e: rusqlite::Error, msg: String) -> Error {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Error::AlreadyExists(msg)
        }
        e => storage(e),
    }
}

/// Every row of a query, mapped.
fn all<T, P: rusqlite::Params>(
    c: &Connection,
    sql: &str,
    params: P,
    map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>> {
    let mut st = c.prepare(sql).map_err(storage)?;
    let rows = st.query_map(params, map).map_err(storage)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(storage)
}

fn group_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Group> {
    Ok(Group {
        id: id_u64(r.get(0)?),
        parent_id: r.get::<_, Option<i64>>(1)?.map(id_u64),
        path: r.get(2)?,
    })
}

fn project_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Project> {
    Ok(Project {
        id: id_u64(r.get(0)?),
        group_id: id_u64(r.get(1)?),
        path: r.get(2)?,
    })
}

const AGENT_FROM: &str = "FROM agents a JOIN projects p ON p.id = a.project_id";

/// The agent matching `condition` (on `a`, the agents table) with its stored config.
fn agent_where<P: rusqlite::Params>(
    c: &Connection,
    condition: &str,
    params: P,
) -> Result<Option<(Agent, String)>> {
    c.query_row(
        &format!("SELECT {AGENT_COLS} {AGENT_FROM} WHERE {condition}"),
        params,
        agent_row,
    )
    .optional()
    .map_err(storage)
}

fn project_by_path(c: &Connection, path: &str) -> Result<Project> {
    c.query_row(
        "SELECT id, group_id, path FROM projects WHERE path = ?1",
        params![path.trim().trim_matches('/')],
        project_row,
    )
    .optional()
    .map_err(storage)?
    .ok_or_else(|| Error::NotFound(format!("project `{path}` not found")))
}

const AGENT_COLS: &str =
    "a.id, a.name, a.project_id, p.path, a.config_version, a.created_at, a.config_yaml";

fn agent_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Agent, String)> {
    Ok((
        Agent {
            id: id_u64(r.get(0)?),
            name: r.get(1)?,
            project_id: id_u64(r.get(2)?),
            project_path: r.get(3)?,
            config_version: id_u64(r.get(4)?),
            created_at: r.get(5)?,
        },
        r.get(6)?,
    ))
}

fn agent_info(agent: Agent, yaml: String) -> Result<AgentInfo> {
    // Stored configurations were validated on set; a parse failure here means the
    // stored row is corrupt, which is a storage error, not the caller's.
    let (config, _) = kas_authz::parse_agent_config(&yaml, &agent.project_path)
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

const JOB_COLS: &str = "j.id, j.project_id, p.path, j.pipeline_id, e.name, j.username, j.status, j.started_at, j.finished_at";
const JOB_FROM: &str = "FROM jobs j JOIN projects p ON p.id = j.project_id LEFT JOIN environments e ON e.id = j.environment_id";

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let status: String = r.get(6)?;
    Ok(Job {
        id: id_u64(r.get(0)?),
        project_id: id_u64(r.get(1)?),
        project_path: r.get(2)?,
        pipeline_id: id_u64(r.get(3)?),
        environment: r.get(4)?,
        username: r.get(5)?,
        status: JobStatus::parse(&status).unwrap_or(JobStatus::Failed),
        started_at: r.get(7)?,
        finished_at: r.get(8)?,
    })
}

fn group_chain(c: &Connection, mut group_id: Option<u64>) -> Result<Vec<Named>> {
    let mut chain = Vec::new();
    while let Some(id) = group_id {
        let (path, parent): (String, Option<i64>) = c
            .query_row(
                "SELECT path, parent_id FROM groups WHERE id = ?1",
                params![to_i64("group", id)?],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(storage)?;
        chain.push(Named { id, path });
        group_id = parent.map(id_u64);
        if chain.len() > 64 {
            return Err(Error::Storage("group hierarchy is cyclic".into()));
        }
    }
    chain.reverse();
    Ok(chain)
}

#[async_trait]
impl ControlPlane for SqliteControlPlane {
    async fn create_group(&self, path: &str, id: Option<u64>) -> Result<Group> {
        let path = validate_path("group", path)?;
        self.run(move |c| {
            let tx = c.transaction().map_err(storage)?;
            let exists = tx
                .query_row(
                    "SELECT 1 FROM groups WHERE path = ?1",
                    params![path],
                    |_| Ok(()),
                )
                .optional()
                .map_err(storage)?
                .is_some();
            if exists && id.is_some() {
                return Err(Error::AlreadyExists(format!(
                    "group `{path}` already exists"
                )));
            }
            let g = ensure_groups(&tx, &path, id)?;
            tx.commit().map_err(storage)?;
            Ok(g)
        })
        .await
    }

    async fn list_groups(&self) -> Result<Vec<Group>> {
        self.run(|c| {
            all(
                c,
                "SELECT id, parent_id, path FROM groups ORDER BY path",
                [],
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
        self.run(move |c| {
            let tx = c.transaction().map_err(storage)?;
            if tx
                .query_row(
                    "SELECT 1 FROM groups WHERE path = ?1",
                    params![path],
                    |_| Ok(()),
                )
                .optional()
                .map_err(storage)?
                .is_some()
            {
                return Err(Error::AlreadyExists(format!("`{path}` is a group")));
            }
            let g = ensure_groups(&tx, &parent, None)?;
            let gid = to_i64("group", g.id)?;
            let res = match id {
                Some(id) => tx.execute(
                    "INSERT INTO projects (id, group_id, path) VALUES (?1, ?2, ?3)",
                    params![to_i64("project", id)?, gid, path],
                ),
                None => tx.execute(
                    "INSERT INTO projects (group_id, path) VALUES (?1, ?2)",
                    params![gid, path],
                ),
            };
            res.map_err(|e| conflict(e, format!("project `{path}` (or its id) already exists")))?;
            let p = Project {
                id: id_u64(tx.last_insert_rowid()),
                group_id: g.id,
                path,
            };
            tx.commit().map_err(storage)?;
            Ok(p)
        })
        .await
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        self.run(|c| {
            all(
                c,
                "SELECT id, group_id, path FROM projects ORDER BY path",
                [],
                project_row,
            )
        })
        .await
    }

    async fn create_agent(&self, project: &str, name: &str) -> Result<(Agent, Secret)> {
        validate_agent_name(name)?;
        let (project, name) = (project.to_string(), name.to_string());
        self.run(move |c| {
            let p = project_by_path(c, &project)?;
            let token = new_token(TokenKind::Agent);
            let created_at = now();
            c.execute(
                "INSERT INTO agents (project_id, name, token_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![to_i64("project", p.id)?, name, hash_token(token.expose()).to_vec(), created_at],
            )
            .map_err(|e| conflict(e, format!("agent `{name}` already exists in project `{}`", p.path)))?;
            Ok((
                Agent {
                    id: id_u64(c.last_insert_rowid()),
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
        self.run(|c| {
            let rows = all(
                c,
                &format!("SELECT {AGENT_COLS} {AGENT_FROM} ORDER BY a.id"),
                [],
                agent_row,
            )?;
            Ok(rows.into_iter().map(|(a, _)| a).collect())
        })
        .await
    }

    async fn get_agent(&self, project: &str, name: &str) -> Result<Agent> {
        let (project, name) = (project.to_string(), name.to_string());
        self.run(move |c| {
            let p = project_by_path(c, &project)?;
            agent_where(
                c,
                "a.project_id = ?1 AND a.name = ?2",
                params![to_i64("project", p.id)?, name],
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
    ) -> Result<(u64, Vec<kas_authz::ConfigWarning>)> {
        let agent = self.get_agent(project, name).await?;
        let (_, warnings) = kas_authz::parse_agent_config(yaml, &agent.project_path)?;
        let yaml = yaml.to_string();
        let id = agent.id;
        let version = self
            .run(move |c| {
                c.execute(
                    "UPDATE agents SET config_yaml = ?1, config_version = config_version + 1 WHERE id = ?2",
                    params![yaml, to_i64("agent", id)?],
                )
                .map_err(storage)?;
                c.query_row(
                    "SELECT config_version FROM agents WHERE id = ?1",
                    params![to_i64("agent", id)?],
                    |r| r.get::<_, i64>(0),
                )
                .map(id_u64)
                .map_err(storage)
            })
            .await?;
        self.notify(Change::AgentConfig { agent_id: id });
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
        self.run(move |c| {
            let p = project_by_path(c, &project)?;
            c.execute(
                "INSERT INTO environments (project_id, name, slug, tier) VALUES (?1, ?2, ?3, ?4)",
                params![to_i64("project", p.id)?, name, slug, tier],
            )
            .map_err(|e| {
                conflict(
                    e,
                    format!("environment `{name}` already exists in `{}`", p.path),
                )
            })?;
            Ok(EnvironmentRecord {
                id: id_u64(c.last_insert_rowid()),
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
        self.run(move |c| {
            let pid = match &project {
                Some(p) => Some(to_i64("project", project_by_path(c, p)?.id)?),
                None => None,
            };
            all(
                c,
                "SELECT e.id, e.project_id, p.path, e.name, e.slug, e.tier FROM environments e \
                 JOIN projects p ON p.id = e.project_id WHERE ?1 IS NULL OR e.project_id = ?1 \
                 ORDER BY p.path, e.name",
                params![pid],
                |r| {
                    Ok(EnvironmentRecord {
                        id: id_u64(r.get(0)?),
                        project_id: id_u64(r.get(1)?),
                        project_path: r.get(2)?,
                        name: r.get(3)?,
                        slug: r.get(4)?,
                        tier: r.get(5)?,
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
        self.run(move |c| {
            let tx = c.transaction().map_err(storage)?;
            let p = project_by_path(&tx, &req.project)?;
            let pid = to_i64("project", p.id)?;
            let env_id: Option<i64> = match &req.environment {
                Some(name) => Some(
                    tx.query_row(
                        "SELECT id FROM environments WHERE project_id = ?1 AND name = ?2",
                        params![pid, name],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(storage)?
                    .ok_or_else(|| {
                        Error::NotFound(format!(
                            "environment `{name}` not found in project `{}` (create it with `kasctl environment create`)",
                            p.path
                        ))
                    })?,
                ),
                None => None,
            };
            let pipeline_id = match req.pipeline_id {
                Some(v) => to_i64("pipeline", v)?,
                None => tx
                    .query_row("SELECT COALESCE(MAX(pipeline_id), 0) + 1 FROM jobs", [], |r| r.get(0))
                    .map_err(storage)?,
            };
            let token = new_token(TokenKind::Job);
            let started_at = now();
            tx.execute(
                "INSERT INTO jobs (project_id, pipeline_id, environment_id, username, token_hash, status, started_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6)",
                params![pid, pipeline_id, env_id, req.username, hash_token(token.expose()).to_vec(), started_at],
            )
            .map_err(storage)?;
            let id = tx.last_insert_rowid();
            let job = tx
                .query_row(&format!("SELECT {JOB_COLS} {JOB_FROM} WHERE j.id = ?1"), params![id], job_row)
                .map_err(storage)?;
            tx.commit().map_err(storage)?;
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
        let job = self
            .run(move |c| {
                let idi = to_i64("job", id)?;
                let n = c
                    .execute(
                        "UPDATE jobs SET status = ?1, finished_at = ?2 WHERE id = ?3 AND status = 'running'",
                        params![status.as_str(), now(), idi],
                    )
                    .map_err(storage)?;
                let job = c
                    .query_row(&format!("SELECT {JOB_COLS} {JOB_FROM} WHERE j.id = ?1"), params![idi], job_row)
                    .optional()
                    .map_err(storage)?
                    .ok_or_else(|| Error::NotFound(format!("job {id} not found")))?;
                if n == 0 {
                    return Err(Error::Invalid(format!("job {id} already finished ({})", job.status.as_str())));
                }
                Ok(job)
            })
            .await?;
        self.notify(Change::JobFinished { job_id: id });
        Ok(job)
    }

    async fn list_jobs(&self) -> Result<Vec<Job>> {
        self.run(|c| {
            all(
                c,
                &format!("SELECT {JOB_COLS} {JOB_FROM} ORDER BY j.id"),
                [],
                job_row,
            )
        })
        .await
    }

    async fn authenticate_agent(&self, token: &str) -> Result<Option<Arc<AgentInfo>>> {
        let h = hash_token(token).to_vec();
        self.run(move |c| {
            let row = agent_where(c, "a.token_hash = ?1", params![h])?;
            row.map(|(a, y)| agent_info(a, y).map(Arc::new)).transpose()
        })
        .await
    }

    async fn agent_info(&self, agent_id: u64) -> Result<Option<Arc<AgentInfo>>> {
        let Ok(id) = i64::try_from(agent_id) else {
            return Ok(None);
        };
        self.run(move |c| {
            let row = agent_where(c, "a.id = ?1", params![id])?;
            row.map(|(a, y)| agent_info(a, y).map(Arc::new)).transpose()
        })
        .await
    }

    async fn all_agent_infos(&self) -> Result<Vec<Arc<AgentInfo>>> {
        self.run(|c| {
            let rows = all(
                c,
                &format!("SELECT {AGENT_COLS} {AGENT_FROM} ORDER BY p.path, a.name"),
                [],
                agent_row,
            )?;
            rows.into_iter()
                .map(|(a, y)| agent_info(a, y).map(Arc::new))
                .collect()
        })
        .await
    }

    async fn authenticate_job(&self, token: &str) -> Result<Option<Arc<JobContext>>> {
        let h = hash_token(token).to_vec();
        self.run(move |c| {
            let row: Option<(i64, i64, i64, String, Option<(String, String, String)>, String, i64)> = c
                .query_row(
                    "SELECT j.id, j.project_id, j.pipeline_id, j.username, e.name, e.slug, e.tier, p.path, p.group_id \
                     FROM jobs j JOIN projects p ON p.id = j.project_id LEFT JOIN environments e ON e.id = j.environment_id \
                     WHERE j.token_hash = ?1 AND j.status = 'running'",
                    params![h],
                    |r| {
                        let env = match r.get::<_, Option<String>>(4)? {
                            Some(n) => Some((n, r.get(5)?, r.get(6)?)),
                            None => None,
                        };
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, env, r.get(7)?, r.get(8)?))
                    },
                )
                .optional()
                .map_err(storage)?;
            let Some((job_id, project_id, pipeline_id, username, env, path, group_id)) = row else {
                return Ok(None);
            };
            let groups = group_chain(c, Some(id_u64(group_id)))?;
            Ok(Some(Arc::new(JobContext {
                job_id: id_u64(job_id),
                pipeline_id: id_u64(pipeline_id),
                project: Named { id: id_u64(project_id), path },
                groups,
                environment: env.map(|(name, slug, tier)| Environment { name, slug, tier }),
                username,
            })))
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn cp() -> SqliteControlPlane {
        SqliteControlPlane::in_memory().expect("db")
    }

    #[tokio::test]
    async fn groups_are_created_like_mkdir_p() {
        let cp = cp().await;
        let g = cp.create_group("acme/platform", None).await.expect("group");
        assert_eq!(g.path, "acme/platform");
        let all = cp.list_groups().await.expect("list");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].path, "acme");
        assert_eq!(g.parent_id, Some(all[0].id));
        // Idempotent without an explicit id.
        assert_eq!(
            cp.create_group("acme/platform", None)
                .await
                .expect("again")
                .id,
            g.id
        );
        // Explicit id on an existing group is a conflict.
        assert!(matches!(
            cp.create_group("acme", Some(5)).await,
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            cp.create_group("bad//path", None).await,
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            cp.create_group("-x", None).await,
            Err(Error::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn project_creates_parents_and_job_context_has_group_chain() {
        let cp = cp().await;
        cp.create_group("group1", Some(23)).await.expect("g");
        cp.create_group("group1/group1-1", Some(25))
            .await
            .expect("g");
        let p = cp
            .create_project("group1/group1-1/project1", Some(150))
            .await
            .expect("p");
        assert_eq!(p.id, 150);
        assert!(matches!(
            cp.create_project("group1/group1-1/project1", None).await,
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            cp.create_project("toplevel", None).await,
            Err(Error::Invalid(_))
        ));
        cp.create_environment("group1/group1-1/project1", "prod", Some("production"))
            .await
            .expect("env");
        assert!(matches!(
            cp.create_environment("group1/group1-1/project1", "x", Some("prod"))
                .await,
            Err(Error::Invalid(_))
        ));
        let (job, token) = cp
            .start_job(&StartJob {
                project: "group1/group1-1/project1".into(),
                environment: Some("prod".into()),
                username: "alice".into(),
                pipeline_id: None,
            })
            .await
            .expect("job");
        assert_eq!(job.status, JobStatus::Running);
        let ctx = cp
            .authenticate_job(token.expose())
            .await
            .expect("auth")
            .expect("running");
        assert_eq!(
            ctx.groups.iter().map(|g| g.id).collect::<Vec<_>>(),
            [23, 25]
        );
        assert_eq!(ctx.project.id, 150);
        let env = ctx.environment.as_ref().expect("env");
        assert_eq!(
            (env.slug.as_str(), env.tier.as_str()),
            ("prod", "production")
        );
        let mut changes = cp.subscribe();
        cp.finish_job(job.id, JobStatus::Success)
            .await
            .expect("finish");
        assert_eq!(
            changes.recv().await.expect("change"),
            Change::JobFinished { job_id: job.id }
        );
        assert!(cp
            .authenticate_job(token.expose())
            .await
            .expect("auth")
            .is_none());
        assert!(cp
            .authenticate_job("kasjob-unknown")
            .await
            .expect("auth")
            .is_none());
        assert!(matches!(
            cp.finish_job(job.id, JobStatus::Success).await,
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            cp.finish_job(999, JobStatus::Success).await,
            Err(Error::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn agents_tokens_and_config() {
        let cp = cp().await;
        cp.create_project("acme/platform/agents", None)
            .await
            .expect("p");
        let (agent, token) = cp
            .create_agent("acme/platform/agents", "prod")
            .await
            .expect("agent");
        assert!(matches!(
            cp.create_agent("acme/platform/agents", "prod").await,
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            cp.create_agent("acme/platform/agents", "Bad_Name").await,
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            cp.create_agent("acme/none", "x").await,
            Err(Error::NotFound(_))
        ));
        let info = cp
            .authenticate_agent(token.expose())
            .await
            .expect("auth")
            .expect("found");
        assert_eq!(info.agent.id, agent.id);
        assert_eq!(info.config_version, 0);
        assert!(cp
            .authenticate_agent("kasagent-wrong")
            .await
            .expect("auth")
            .is_none());
        let err = cp
            .set_agent_config(
                "acme/platform/agents",
                "prod",
                "ci_access:\n  projects:\n    - id: acme/x\n      access_as: {bogus: {}}\n",
            )
            .await
            .expect_err("invalid");
        assert!(
            err.to_string().contains("ci_access.projects[0].access_as"),
            "{err}"
        );
        let (v, w) = cp
            .set_agent_config(
                "acme/platform/agents",
                "prod",
                "ci_access:\n  projects:\n    - id: acme/web/shop\n",
            )
            .await
            .expect("valid");
        assert_eq!(v, 1);
        assert!(w.is_empty());
        let info = cp.agent_info(agent.id).await.expect("info").expect("found");
        assert_eq!(info.config_version, 1);
        assert_eq!(info.config.ci_access.projects[0].id, "acme/web/shop");
    }

    #[tokio::test]
    async fn ids_are_stable_across_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("cp.sqlite");
        let id = {
            let cp = SqliteControlPlane::open(&path).expect("open");
            cp.create_project("a/b", None).await.expect("p").id
        };
        let cp = SqliteControlPlane::open(&path).expect("open");
        assert_eq!(cp.list_projects().await.expect("list")[0].id, id);
        assert_eq!(cp.create_project("a/c", None).await.expect("p").id, id + 1);
    }
}
