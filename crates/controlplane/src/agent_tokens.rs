//! Agent tokens: several per agent (two active at most, for rotation), each stored
//! only as its hash, revocable, with the time it was last used.

use crate::sql::{Row, Tx, TxExt};
use crate::token::{hash_token, new_token, Secret, TokenKind};
use crate::{AgentToken, Change, Error, Result, MAX_ACTIVE_AGENT_TOKENS};

/// Gives every agent made before tokens had their own table its one token, once
/// (valid on SQLite and PostgreSQL; run after the schema, on every start).
pub(crate) const MIGRATE: &str =
    "INSERT INTO agent_tokens (agent_id, name, token_hash, created_at) \
     SELECT a.id, 'default', a.token_hash, a.created_at FROM agents a \
     WHERE NOT EXISTS (SELECT 1 FROM agent_tokens t WHERE t.agent_id = a.id);";

const COLS: &str = "id, agent_id, name, created_at, last_used_at, revoked_at";

fn token_row(r: &Row) -> Result<AgentToken> {
    Ok(AgentToken {
        id: r.id(0)?,
        agent_id: r.id(1)?,
        name: r.text(2)?,
        created_at: r.int(3)?,
        last_used_at: r.opt_int(4)?,
        revoked_at: r.opt_int(5)?,
    })
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "token name `{name}` is invalid: use letters, digits, '-', '_' and '.', at most 64 characters"
        )))
    }
}

/// An agent's tokens, oldest first.
pub(crate) fn list(tx: &mut dyn Tx, agent_id: i64) -> Result<Vec<AgentToken>> {
    tx.query(
        &format!("SELECT {COLS} FROM agent_tokens WHERE agent_id = $1 ORDER BY id"),
        &[agent_id.into()],
    )?
    .iter()
    .map(token_row)
    .collect()
}

/// Inserts a new token for `agent_id` (which must exist), refusing a third active one
/// and a name an active token already has. `name`: generated when absent.
pub(crate) fn create(
    tx: &mut dyn Tx,
    agent_id: i64,
    name: Option<&str>,
    now: i64,
) -> Result<(AgentToken, Secret)> {
    // Locks the agent's row (PostgreSQL) so that concurrent creations count in turn;
    // SQLite runs one transaction at a time anyway.
    let n = tx.execute(
        "UPDATE agents SET config_version = config_version WHERE id = $1",
        &[agent_id.into()],
    )?;
    if n == 0 {
        return Err(Error::NotFound(format!("agent {agent_id} not found")));
    }
    let existing = list(tx, agent_id)?;
    let active: Vec<&AgentToken> = existing.iter().filter(|t| t.is_active()).collect();
    if active.len() >= MAX_ACTIVE_AGENT_TOKENS {
        let names: Vec<&str> = active.iter().map(|t| t.name.as_str()).collect();
        return Err(Error::Conflict(format!(
            "the agent already has {MAX_ACTIVE_AGENT_TOKENS} active tokens ({}), the most it may have; revoke one first",
            names.join(", ")
        )));
    }
    let name = match name {
        Some(n) => {
            validate_name(n)?;
            if active.iter().any(|t| t.name == n) {
                return Err(Error::AlreadyExists(format!(
                    "the agent already has an active token named `{n}`"
                )));
            }
            n.to_string()
        }
        None => format!("token-{}", existing.len() + 1),
    };
    let token = new_token(TokenKind::Agent);
    let t = insert(tx, agent_id, &name, &token, now)?;
    Ok((t, token))
}

/// Stores `token` (its hash) as the agent's token `name`.
pub(crate) fn insert(
    tx: &mut dyn Tx,
    agent_id: i64,
    name: &str,
    token: &Secret,
    now: i64,
) -> Result<AgentToken> {
    let rows = tx.query(
        "INSERT INTO agent_tokens (agent_id, name, token_hash, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
        &[
            agent_id.into(),
            name.into(),
            hash_token(token.expose()).to_vec().into(),
            now.into(),
        ],
    )?;
    let id = rows
        .first()
        .ok_or_else(|| Error::Storage("INSERT returned no id".into()))?
        .id(0)?;
    Ok(AgentToken {
        id,
        agent_id: u64::try_from(agent_id).unwrap_or_default(),
        name: name.to_string(),
        created_at: now,
        last_used_at: None,
        revoked_at: None,
    })
}

/// Revokes the active token of `agent_id` named `token` (or with that id).
pub(crate) fn revoke(tx: &mut dyn Tx, agent_id: i64, token: &str, now: i64) -> Result<AgentToken> {
    let tokens = list(tx, agent_id)?;
    let by_id = token.parse::<u64>().ok();
    let found = tokens
        .iter()
        .filter(|t| t.is_active())
        .find(|t| t.name == token || Some(t.id) == by_id)
        .or_else(|| {
            tokens
                .iter()
                .find(|t| t.name == token || Some(t.id) == by_id)
        })
        .ok_or_else(|| Error::NotFound(format!("the agent has no token `{token}`")))?;
    if !found.is_active() {
        return Err(Error::Conflict(format!(
            "token `{}` is already revoked",
            found.name
        )));
    }
    let id = i64::try_from(found.id).map_err(|_| Error::Storage("token id too large".into()))?;
    tx.execute(
        "UPDATE agent_tokens SET revoked_at = $1 WHERE id = $2",
        &[now.into(), id.into()],
    )?;
    tx.announce(Change::AgentTokenRevoked {
        agent_id: found.agent_id,
        token_id: found.id,
    })?;
    let mut t = found.clone();
    t.revoked_at = Some(now);
    Ok(t)
}

/// Records a use of the token.
pub(crate) fn touch(tx: &mut dyn Tx, token_id: i64, now: i64) -> Result<()> {
    tx.execute(
        "UPDATE agent_tokens SET last_used_at = $1 WHERE id = $2",
        &[now.into(), token_id.into()],
    )?;
    Ok(())
}

/// Deletes the agent's tokens (with the agent).
pub(crate) fn delete_all(tx: &mut dyn Tx, agent_id: i64) -> Result<()> {
    tx.execute(
        "DELETE FROM agent_tokens WHERE agent_id = $1",
        &[agent_id.into()],
    )?;
    Ok(())
}

/// The id of the active token with this hash, if any.
pub(crate) fn active_by_hash(tx: &mut dyn Tx, hash: Vec<u8>) -> Result<Option<(u64, u64)>> {
    tx.query_opt(
        "SELECT id, agent_id FROM agent_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
        &[hash.into()],
    )?
    .map(|r| Ok((r.id(0)?, r.id(1)?)))
    .transpose()
}
