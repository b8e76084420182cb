//! The embedded control plane backend: one SQLite file, one connection behind a mutex,
//! statements run on the blocking pool. For a single kas only: several kas replicas
//! share PostgreSQL instead. Changes are announced in-process after commit.

use crate::sql::{Backend, Cell, DbError, Row, Tx, Val};
use crate::store::SqlControlPlane;
use crate::{Change, Error, Result};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::Connection;
use std::path::Path;
use std::sync::Mutex;
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
    finished_at INTEGER,
    protected_ref INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS agent_tokens (
    id INTEGER PRIMARY KEY,
    agent_id INTEGER NOT NULL REFERENCES agents(id),
    name TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS agent_tokens_agent ON agent_tokens (agent_id);
"#;

/// The embedded control plane.
pub type SqliteControlPlane = SqlControlPlane<Sqlite>;

/// The SQLite backend; see the module docs.
pub struct Sqlite {
    conn: Mutex<Connection>,
    changes: broadcast::Sender<Change>,
}

fn storage(e: rusqlite::Error) -> Error {
    Error::Storage(Box::new(e))
}

impl SqlControlPlane<Sqlite> {
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
        // Columns added after the first release: added to older files.
        let has_protected: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('jobs') WHERE name = 'protected_ref'",
                [],
                |r| r.get(0),
            )
            .map_err(storage)?;
        if has_protected == 0 {
            conn.execute_batch(
                "ALTER TABLE jobs ADD COLUMN protected_ref INTEGER NOT NULL DEFAULT 0",
            )
            .map_err(storage)?;
        }
        conn.execute_batch(crate::agent_tokens::MIGRATE)
            .map_err(storage)?;
        conn.execute_batch(&crate::apps::schema("id INTEGER PRIMARY KEY"))
            .map_err(storage)?;
        conn.execute_batch(&crate::eks::schema("id INTEGER PRIMARY KEY"))
            .map_err(storage)?;
        let (changes, _) = broadcast::channel(1024);
        Ok(SqlControlPlane::with_backend(Sqlite {
            conn: Mutex::new(conn),
            changes,
        }))
    }
}

fn db_error(e: rusqlite::Error) -> DbError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            DbError::Unique
        }
        e => DbError::Other(Box::new(e)),
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Val::Int(Some(v)) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            Val::Text(Some(v)) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Val::Bytes(v) => ToSqlOutput::Borrowed(ValueRef::Blob(v)),
            Val::Int(None) | Val::Text(None) => ToSqlOutput::Borrowed(ValueRef::Null),
        })
    }
}

fn cell(v: ValueRef<'_>) -> Cell {
    match v {
        ValueRef::Null => Cell::Null,
        ValueRef::Integer(i) => Cell::Int(i),
        // Never stored by this schema; kept lossless enough for a diagnostic.
        ValueRef::Real(f) => Cell::Text(f.to_string()),
        ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Cell::Bytes(b.to_vec()),
    }
}

/// A transaction plus the changes to announce once it commits.
struct SqliteTx<'c> {
    tx: rusqlite::Transaction<'c>,
    announced: Vec<Change>,
}

impl Tx for SqliteTx<'_> {
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, DbError> {
        let mut st = self.tx.prepare_cached(sql).map_err(db_error)?;
        let n = st.column_count();
        let mut rows = st
            .query(rusqlite::params_from_iter(params.iter()))
            .map_err(db_error)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(db_error)? {
            let mut cells = Vec::with_capacity(n);
            for i in 0..n {
                cells.push(cell(r.get_ref(i).map_err(db_error)?));
            }
            out.push(Row(cells));
        }
        Ok(out)
    }

    fn execute(&mut self, sql: &str, params: &[Val]) -> Result<u64, DbError> {
        let n = self
            .tx
            .prepare_cached(sql)
            .and_then(|mut st| st.execute(rusqlite::params_from_iter(params.iter())))
            .map_err(db_error)?;
        Ok(n as u64)
    }

    fn explicit_id_inserted(&mut self, _table: &str) -> Result<(), DbError> {
        // An INTEGER PRIMARY KEY continues after the largest id by itself.
        Ok(())
    }

    fn announce(&mut self, change: Change) -> Result<(), DbError> {
        self.announced.push(change);
        Ok(())
    }
}

impl Backend for Sqlite {
    fn transaction<T, F: FnOnce(&mut dyn Tx) -> Result<T>>(&self, f: F) -> Result<T> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| Error::Storage("control plane connection lock poisoned".into()))?;
        let mut tx = SqliteTx {
            tx: conn.transaction().map_err(storage)?,
            announced: Vec::new(),
        };
        // Dropping the transaction on error rolls it back.
        let out = f(&mut tx)?;
        let announced = std::mem::take(&mut tx.announced);
        tx.tx.commit().map_err(storage)?;
        for c in announced {
            // No receivers is fine: nothing listens yet.
            let _ = self.changes.send(c);
        }
        Ok(out)
    }

    /// One connection, behind a lock.
    fn concurrency(&self) -> usize {
        1
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ControlPlane;

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
