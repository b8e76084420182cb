//! The little SQL surface the store needs, implemented once per database so the store
//! logic (and thus behaviour) is shared between the embedded SQLite file and PostgreSQL.
//!
//! Statements are written once with `$1, $2, ...` placeholders, which both databases
//! accept (SQLite numbers named parameters by first appearance, so each statement
//! introduces them in order). Values cross the seam as [`Val`] and come back as [`Row`]s
//! of owned [`Cell`]s; that costs a copy per cell, which is nothing next to a query.

use crate::{Change, Error, Result};

/// A statement parameter.
#[derive(Debug, Clone)]
pub(crate) enum Val {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Vec<u8>),
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(Some(v))
    }
}
impl From<Option<i64>> for Val {
    fn from(v: Option<i64>) -> Self {
        Val::Int(v)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::Text(Some(v.to_string()))
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Self {
        Val::Text(Some(v.clone()))
    }
}
impl From<Vec<u8>> for Val {
    fn from(v: Vec<u8>) -> Self {
        Val::Bytes(v)
    }
}

/// One value of a result row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

/// One result row.
#[derive(Debug, Clone)]
pub(crate) struct Row(pub(crate) Vec<Cell>);

fn bad_column(i: usize, want: &str) -> Error {
    Error::Storage(format!("column {i} is not {want}").into())
}

impl Row {
    pub(crate) fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.0.get(i) {
            Some(Cell::Int(v)) => Ok(Some(*v)),
            Some(Cell::Null) => Ok(None),
            _ => Err(bad_column(i, "an integer")),
        }
    }
    pub(crate) fn int(&self, i: usize) -> Result<i64> {
        self.opt_int(i)?
            .ok_or_else(|| bad_column(i, "a non-null integer"))
    }
    /// A non-negative id column.
    pub(crate) fn id(&self, i: usize) -> Result<u64> {
        u64::try_from(self.int(i)?).map_err(|_| bad_column(i, "a non-negative id"))
    }
    pub(crate) fn opt_id(&self, i: usize) -> Result<Option<u64>> {
        self.opt_int(i)?
            .map(|v| u64::try_from(v).map_err(|_| bad_column(i, "a non-negative id")))
            .transpose()
    }
    pub(crate) fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.0.get(i) {
            Some(Cell::Text(v)) => Ok(Some(v.clone())),
            Some(Cell::Null) => Ok(None),
            _ => Err(bad_column(i, "text")),
        }
    }
    pub(crate) fn text(&self, i: usize) -> Result<String> {
        self.opt_text(i)?
            .ok_or_else(|| bad_column(i, "non-null text"))
    }
}

/// A database error, classified as far as the store needs.
#[derive(Debug)]
pub(crate) enum DbError {
    /// A uniqueness constraint was violated (the caller names what already exists).
    Unique,
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unique => Error::Storage("unexpected uniqueness conflict".into()),
            DbError::Other(e) => Error::Storage(e),
        }
    }
}

/// An open transaction. Every store operation runs in exactly one.
pub(crate) trait Tx {
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>, DbError>;
    fn execute(&mut self, sql: &str, params: &[Val]) -> Result<u64, DbError>;
    /// After a row was inserted with an explicit id: keep the table's id generator
    /// ahead of it (SQLite does this by itself).
    fn explicit_id_inserted(&mut self, table: &str) -> Result<(), DbError>;
    /// Announces a change, delivered to every kas sharing the database once the
    /// transaction commits (and not at all if it rolls back).
    fn announce(&mut self, change: Change) -> Result<(), DbError>;
}

/// A database the store runs on: it hands out transactions on a blocking thread.
pub(crate) trait Backend: Send + Sync + 'static {
    /// Runs `f` in a transaction, committing when it returns `Ok`.
    fn transaction<T, F: FnOnce(&mut dyn Tx) -> Result<T>>(&self, f: F) -> Result<T>;
    /// Changes from every kas sharing the database, from now on.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change>;
    /// Transactions that can run at once (connections): more would only wait, each
    /// holding a blocking thread.
    fn concurrency(&self) -> usize;
}

/// Helpers on top of [`Tx`].
pub(crate) trait TxExt: Tx {
    fn query_opt(&mut self, sql: &str, params: &[Val]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
    fn query_one(&mut self, sql: &str, params: &[Val]) -> Result<Row> {
        self.query_opt(sql, params)?
            .ok_or_else(|| Error::Storage("query returned no row".into()))
    }
    fn exists(&mut self, sql: &str, params: &[Val]) -> Result<bool> {
        Ok(self.query_opt(sql, params)?.is_some())
    }
}

impl<T: Tx + ?Sized> TxExt for T {}

/// Maps a uniqueness violation to [`Error::AlreadyExists`] with `msg`.
pub(crate) fn conflict(msg: impl FnOnce() -> String) -> impl FnOnce(DbError) -> Error {
    move |e| match e {
        DbError::Unique => Error::AlreadyExists(msg()),
        other => other.into(),
    }
}

/// Encodes a change as a notification payload (PostgreSQL `NOTIFY`).
pub(crate) fn encode_change(c: &Change) -> String {
    match c {
        Change::AgentConfig { agent_id } => format!("agent_config:{agent_id}"),
        Change::JobFinished { job_id } => format!("job_finished:{job_id}"),
        Change::AgentTokenRevoked { agent_id, token_id } => {
            format!("agent_token_revoked:{agent_id}:{token_id}")
        }
        Change::AgentDeleted { agent_id } => format!("agent_deleted:{agent_id}"),
        Change::Resync => "resync".to_string(),
    }
}

/// Decodes a notification payload; unknown payloads (a newer kas) mean "resync".
pub(crate) fn decode_change(s: &str) -> Change {
    let parse = |v: &str| v.parse::<u64>().ok();
    match s.split_once(':') {
        Some(("agent_config", v)) => parse(v).map(|agent_id| Change::AgentConfig { agent_id }),
        Some(("job_finished", v)) => parse(v).map(|job_id| Change::JobFinished { job_id }),
        Some(("agent_token_revoked", v)) => v.split_once(':').and_then(|(a, t)| {
            Some(Change::AgentTokenRevoked {
                agent_id: parse(a)?,
                token_id: parse(t)?,
            })
        }),
        Some(("agent_deleted", v)) => parse(v).map(|agent_id| Change::AgentDeleted { agent_id }),
        _ => None,
    }
    .unwrap_or(Change::Resync)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_and_unknown_means_resync() {
        for c in [
            Change::AgentConfig { agent_id: 7 },
            Change::JobFinished { job_id: 9 },
            Change::AgentTokenRevoked {
                agent_id: 3,
                token_id: 11,
            },
            Change::AgentDeleted { agent_id: 4 },
            Change::Resync,
        ] {
            assert_eq!(decode_change(&encode_change(&c)), c);
        }
        assert_eq!(decode_change("agent_config:x"), Change::Resync);
        assert_eq!(decode_change("something_new:1"), Change::Resync);
        assert_eq!(decode_change("agent_token_revoked:3"), Change::Resync);
    }
}
