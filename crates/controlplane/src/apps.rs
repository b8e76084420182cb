//! Managed applications of agents' clusters: one row per application, holding its
//! state, the running operation and the lease of the kas instance running it (so
//! that another kas takes over when that one stops).

use crate::sql::{Row, Tx, TxExt, Val};
use crate::{AppOperation, AppOutcome, AppState, ClusterApp, Error, Result, StartAppOperation};

/// Valid on SQLite and PostgreSQL, apart from the id column.
pub(crate) fn schema(id_column: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS cluster_apps (
    {id_column},
    agent_id BIGINT NOT NULL REFERENCES agents(id),
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    operation TEXT NOT NULL,
    version TEXT,
    values_yaml TEXT NOT NULL DEFAULT '',
    error_code TEXT,
    pod TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    lease_owner TEXT NOT NULL DEFAULT '',
    lease_until BIGINT NOT NULL DEFAULT 0,
    UNIQUE (agent_id, name)
);"
    )
}

const COLS: &str =
    "id, agent_id, name, state, operation, version, values_yaml, error_code, pod, updated_at";

fn app_row(r: &Row) -> Result<(i64, ClusterApp)> {
    let state = r.text(3)?;
    let operation = r.text(4)?;
    let bad = |what: &str, v: &str| Error::Storage(format!("unknown {what} `{v}`").into());
    Ok((
        r.int(0)?,
        ClusterApp {
            agent_id: r.id(1)?,
            name: r.text(2)?,
            state: AppState::parse(&state).ok_or_else(|| bad("state", &state))?,
            operation: AppOperation::parse(&operation)
                .ok_or_else(|| bad("operation", &operation))?,
            version: r.opt_text(5)?,
            values_yaml: r.text(6)?,
            error_code: r.opt_text(7)?,
            pod: r.text(8)?,
            updated_at: r.int(9)?,
        },
    ))
}

fn get(tx: &mut dyn Tx, agent_id: i64, name: &str) -> Result<Option<(i64, ClusterApp)>> {
    tx.query_opt(
        &format!("SELECT {COLS} FROM cluster_apps WHERE agent_id = $1 AND name = $2"),
        &[agent_id.into(), name.into()],
    )?
    .as_ref()
    .map(app_row)
    .transpose()
}

/// Why `op` cannot start on an application in `current`'s state, if it cannot.
fn refusal(op: AppOperation, current: Option<&ClusterApp>) -> Option<String> {
    let state = current.map(|c| c.state);
    match (op, state) {
        (_, Some(s)) if s.is_running() => current.map(|c| {
            format!(
                "`{}` is {} (pod {}); wait until it finishes",
                c.name,
                s.as_str(),
                c.pod
            )
        }),
        (AppOperation::Install, Some(AppState::Installed)) => current.map(|c| {
            format!(
                "`{}` is already installed (version {}); use upgrade",
                c.name,
                c.version.as_deref().unwrap_or("unknown")
            )
        }),
        (AppOperation::Upgrade | AppOperation::Uninstall, None | Some(AppState::Uninstalled)) => {
            Some("the application is not installed; use install".into())
        }
        _ => None,
    }
}

/// Starts `op` unless another operation on the application runs or its state does
/// not allow it ([`Error::Conflict`]).
pub(crate) fn begin(tx: &mut dyn Tx, op: &StartAppOperation, now: i64) -> Result<ClusterApp> {
    let agent_id = crate::store::to_i64("agent", op.agent_id)?;
    if !tx.exists("SELECT 1 FROM agents WHERE id = $1", &[agent_id.into()])? {
        return Err(Error::NotFound(format!("agent {} not found", op.agent_id)));
    }
    let current = get(tx, agent_id, &op.name)?;
    if let Some(why) = refusal(op.operation, current.as_ref().map(|(_, c)| c)) {
        return Err(Error::Conflict(why));
    }
    let pod = format!("{}-{}", op.operation.as_str(), op.name);
    let vals: Vec<Val> = vec![
        op.operation.running_state().as_str().into(),
        op.operation.as_str().into(),
        Val::Text(op.version.clone()),
        (&op.values_yaml).into(),
        (&pod).into(),
        now.into(),
        (&op.owner).into(),
        op.lease_until.into(),
        agent_id.into(),
        (&op.name).into(),
    ];
    let n = tx.execute(
        "UPDATE cluster_apps SET state = $1, operation = $2, version = $3, values_yaml = $4, \
         error_code = NULL, pod = $5, updated_at = $6, lease_owner = $7, lease_until = $8 \
         WHERE agent_id = $9 AND name = $10",
        &vals,
    )?;
    if n == 0 {
        tx.execute(
            "INSERT INTO cluster_apps (state, operation, version, values_yaml, pod, updated_at, \
             lease_owner, lease_until, agent_id, name) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &vals,
        )
        .map_err(crate::sql::conflict(|| {
            format!("`{}` is being started by another request", op.name)
        }))?;
    }
    get(tx, agent_id, &op.name)?
        .map(|(_, a)| a)
        .ok_or_else(|| Error::Storage("the application just written is missing".into()))
}

/// Records how the running operation ended and drops its lease.
pub(crate) fn finish(
    tx: &mut dyn Tx,
    agent_id: i64,
    name: &str,
    outcome: &AppOutcome,
    now: i64,
) -> Result<ClusterApp> {
    let n = tx.execute(
        "UPDATE cluster_apps SET state = $1, version = $2, error_code = $3, updated_at = $4, \
         lease_owner = '', lease_until = 0 WHERE agent_id = $5 AND name = $6",
        &[
            outcome.state.as_str().into(),
            Val::Text(outcome.version.clone()),
            Val::Text(outcome.error_code.clone()),
            now.into(),
            agent_id.into(),
            name.into(),
        ],
    )?;
    if n == 0 {
        return Err(Error::NotFound(format!("application `{name}` not found")));
    }
    get(tx, agent_id, name)?
        .map(|(_, a)| a)
        .ok_or_else(|| Error::Storage("the application just written is missing".into()))
}

/// Extends `owner`'s lease (`until` 0 releases it); false when the operation is no
/// longer running under `owner`.
pub(crate) fn renew(
    tx: &mut dyn Tx,
    agent_id: i64,
    name: &str,
    owner: &str,
    until: i64,
) -> Result<bool> {
    let running: Vec<Val> = [
        AppState::Installing,
        AppState::Upgrading,
        AppState::Uninstalling,
    ]
    .iter()
    .map(|s| s.as_str().into())
    .collect();
    let mut vals = vec![until.into(), agent_id.into(), name.into(), owner.into()];
    vals.extend(running);
    let n = tx.execute(
        "UPDATE cluster_apps SET lease_until = $1 WHERE agent_id = $2 AND name = $3 \
         AND lease_owner = $4 AND state IN ($5, $6, $7)",
        &vals,
    )?;
    Ok(n == 1)
}

/// Takes over running operations whose lease ran out by `now`.
pub(crate) fn claim(tx: &mut dyn Tx, owner: &str, now: i64, until: i64) -> Result<Vec<ClusterApp>> {
    let stale = tx.query(
        &format!(
            "SELECT {COLS} FROM cluster_apps WHERE state IN ($1, $2, $3) AND lease_until < $4 ORDER BY id"
        ),
        &[
            AppState::Installing.as_str().into(),
            AppState::Upgrading.as_str().into(),
            AppState::Uninstalling.as_str().into(),
            now.into(),
        ],
    )?;
    let mut claimed = Vec::new();
    for r in &stale {
        let (id, app) = app_row(r)?;
        // Another kas may claim the same row at once: only one update matches.
        let n = tx.execute(
            "UPDATE cluster_apps SET lease_owner = $1, lease_until = $2 WHERE id = $3 AND lease_until < $4",
            &[owner.into(), until.into(), id.into(), now.into()],
        )?;
        if n == 1 {
            claimed.push(app);
        }
    }
    Ok(claimed)
}

/// Applications of one agent, or of all, by agent and name.
pub(crate) fn list(tx: &mut dyn Tx, agent_id: Option<i64>) -> Result<Vec<ClusterApp>> {
    let rows = match agent_id {
        Some(id) => tx.query(
            &format!("SELECT {COLS} FROM cluster_apps WHERE agent_id = $1 ORDER BY agent_id, name"),
            &[id.into()],
        )?,
        None => tx.query(
            &format!("SELECT {COLS} FROM cluster_apps ORDER BY agent_id, name"),
            &[],
        )?,
    };
    rows.iter().map(|r| app_row(r).map(|(_, a)| a)).collect()
}

/// Forgets the applications of a deleted agent.
pub(crate) fn delete_all(tx: &mut dyn Tx, agent_id: i64) -> Result<()> {
    tx.execute(
        "DELETE FROM cluster_apps WHERE agent_id = $1",
        &[agent_id.into()],
    )?;
    Ok(())
}
