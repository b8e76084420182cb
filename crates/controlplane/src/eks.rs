//! EKS clusters kas creates in customers' AWS accounts: one row per cluster with its
//! request, progress, outputs, the temporary AWS credentials while they are needed
//! (wiped after), and the lease of the kas working on it.

use crate::sql::{Row, Tx, TxExt, Val};
use crate::{AwsCredentials, EksCluster, EksEvent, EksSpec, EksState, EksWork, Error, Result};

/// Valid on SQLite and PostgreSQL, apart from the id column.
pub(crate) fn schema(id_column: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS eks_clusters (
    {id_column},
    name TEXT NOT NULL UNIQUE,
    project_id BIGINT NOT NULL REFERENCES projects(id),
    state TEXT NOT NULL,
    error_code TEXT,
    external_id TEXT NOT NULL,
    spec_json TEXT,
    stack_name TEXT NOT NULL,
    stack_id TEXT,
    stack_status TEXT,
    endpoint TEXT,
    ca_data TEXT,
    node_role_arn TEXT,
    agent_id BIGINT,
    access_key_id TEXT,
    secret_access_key TEXT,
    session_token TEXT,
    credentials_expire_at BIGINT,
    events_json TEXT NOT NULL DEFAULT '[]',
    polls BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT NOT NULL DEFAULT '',
    lease_until BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);"
    )
}

const COLS: &str = "c.id, c.name, p.path, c.state, c.error_code, c.external_id, c.spec_json, \
     c.stack_name, c.stack_id, c.stack_status, c.endpoint, c.ca_data, c.node_role_arn, \
     c.agent_id, c.access_key_id, c.secret_access_key, c.session_token, \
     c.credentials_expire_at, c.events_json, c.polls, c.created_at, c.updated_at";
const FROM: &str = "FROM eks_clusters c JOIN projects p ON p.id = c.project_id";

fn corrupt(what: &str) -> Error {
    Error::Storage(format!("stored EKS cluster has an invalid {what}").into())
}

fn work_row(r: &Row) -> Result<EksWork> {
    let state = r.text(3)?;
    let spec: Option<EksSpec> = r
        .opt_text(6)?
        .map(|s| serde_json::from_str(&s).map_err(|_| corrupt("request")))
        .transpose()?;
    let events: Vec<EksEvent> =
        serde_json::from_str(&r.text(18)?).map_err(|_| corrupt("event list"))?;
    let credentials = match (r.opt_text(14)?, r.opt_text(15)?, r.opt_text(16)?) {
        (Some(access_key_id), Some(secret_access_key), Some(session_token)) => {
            Some(AwsCredentials {
                access_key_id,
                secret_access_key,
                session_token,
                expires_at: r.opt_int(17)?.unwrap_or(0),
            })
        }
        _ => None,
    };
    Ok(EksWork {
        cluster: EksCluster {
            id: r.id(0)?,
            name: r.text(1)?,
            project_path: r.text(2)?,
            state: EksState::parse(&state).ok_or_else(|| corrupt("state"))?,
            error_code: r.opt_text(4)?,
            external_id: r.text(5)?,
            spec,
            stack_name: r.text(7)?,
            stack_status: r.opt_text(9)?,
            endpoint: r.opt_text(10)?,
            agent_id: r.opt_id(13)?,
            holds_credentials: credentials.is_some(),
            events,
            created_at: r.int(20)?,
            updated_at: r.int(21)?,
        },
        stack_id: r.opt_text(8)?,
        ca_data: r.opt_text(11)?,
        node_role_arn: r.opt_text(12)?,
        credentials,
        polls: u32::try_from(r.int(19)?).unwrap_or(u32::MAX),
    })
}

fn by_name(tx: &mut dyn Tx, name: &str) -> Result<EksWork> {
    tx.query_opt(
        &format!("SELECT {COLS} {FROM} WHERE c.name = $1"),
        &[name.into()],
    )?
    .as_ref()
    .map(work_row)
    .transpose()?
    .ok_or_else(|| Error::NotFound(format!("EKS cluster `{name}` not found")))
}

/// A cluster name usable in a CloudFormation stack name, an agent name and a label.
fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "cluster name `{name}` is invalid: lowercase letters, digits and '-', starting with a letter, at most 63"
        )))
    }
}

/// A new cluster record in `project`, waiting for its provisioning role.
pub(crate) fn prepare(
    tx: &mut dyn Tx,
    name: &str,
    project_id: i64,
    external_id: &str,
    now: i64,
) -> Result<EksCluster> {
    validate_name(name)?;
    tx.execute(
        "INSERT INTO eks_clusters (name, project_id, state, external_id, stack_name, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            name.into(),
            project_id.into(),
            EksState::AwaitingRole.as_str().into(),
            external_id.into(),
            format!("kas-eks-{name}").as_str().into(),
            now.into(),
            now.into(),
        ],
    )
    .map_err(crate::sql::conflict(|| format!("EKS cluster `{name}` already exists")))?;
    Ok(by_name(tx, name)?.cluster)
}

/// Moves `name` to `state` under `owner`'s lease, if its state is one of `from`.
fn start(
    tx: &mut dyn Tx,
    name: &str,
    from: &[EksState],
    state: EksState,
    spec: Option<&EksSpec>,
    lease: (&str, i64),
    now: i64,
) -> Result<EksWork> {
    let current = by_name(tx, name)?;
    if !from.contains(&current.cluster.state) {
        return Err(Error::Conflict(format!(
            "EKS cluster `{name}` is {}; this needs it {}",
            current.cluster.state.as_str(),
            from.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    let spec_json = match spec {
        Some(s) => Some(serde_json::to_string(s).map_err(|e| Error::Storage(Box::new(e)))?),
        None => current
            .cluster
            .spec
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Error::Storage(Box::new(e)))?,
    };
    tx.execute(
        "UPDATE eks_clusters SET state = $1, error_code = NULL, spec_json = $2, polls = 0, \
         lease_owner = $3, lease_until = $4, updated_at = $5 WHERE name = $6",
        &[
            state.as_str().into(),
            Val::Text(spec_json),
            lease.0.into(),
            lease.1.into(),
            now.into(),
            name.into(),
        ],
    )?;
    by_name(tx, name)
}

/// Starts creating a prepared cluster (or retries an errored one).
pub(crate) fn request(
    tx: &mut dyn Tx,
    name: &str,
    spec: &EksSpec,
    lease: (&str, i64),
    now: i64,
) -> Result<EksWork> {
    let from = [EksState::AwaitingRole, EksState::Errored];
    start(
        tx,
        name,
        &from,
        EksState::AssumingRole,
        Some(spec),
        lease,
        now,
    )
}

/// Starts deleting a cluster (its stack, then its record's agent).
pub(crate) fn delete(tx: &mut dyn Tx, name: &str, lease: (&str, i64), now: i64) -> Result<EksWork> {
    let from = [
        EksState::AwaitingRole,
        EksState::Ready,
        EksState::Errored,
        EksState::Deleted,
    ];
    start(tx, name, &from, EksState::Deleting, None, lease, now)
}

/// Writes what the worker holding the lease learnt; false when the lease is no
/// longer `owner`'s (another kas took over).
pub(crate) fn save(
    tx: &mut dyn Tx,
    owner: &str,
    w: &EksWork,
    lease_until: i64,
    now: i64,
) -> Result<bool> {
    let c = &w.cluster;
    let cred = w.credentials.as_ref();
    let events = serde_json::to_string(&c.events).map_err(|e| Error::Storage(Box::new(e)))?;
    let agent = c
        .agent_id
        .map(|a| crate::store::to_i64("agent", a))
        .transpose()?;
    let n = tx.execute(
        "UPDATE eks_clusters SET state = $1, error_code = $2, stack_id = $3, stack_status = $4, \
         endpoint = $5, ca_data = $6, node_role_arn = $7, agent_id = $8, access_key_id = $9, \
         secret_access_key = $10, session_token = $11, credentials_expire_at = $12, \
         events_json = $13, polls = $14, lease_until = $15, updated_at = $16 \
         WHERE id = $17 AND lease_owner = $18",
        &[
            c.state.as_str().into(),
            Val::Text(c.error_code.clone()),
            Val::Text(w.stack_id.clone()),
            Val::Text(c.stack_status.clone()),
            Val::Text(c.endpoint.clone()),
            Val::Text(w.ca_data.clone()),
            Val::Text(w.node_role_arn.clone()),
            Val::Int(agent),
            Val::Text(cred.map(|c| c.access_key_id.clone())),
            Val::Text(cred.map(|c| c.secret_access_key.clone())),
            Val::Text(cred.map(|c| c.session_token.clone())),
            Val::Int(cred.map(|c| c.expires_at)),
            events.as_str().into(),
            i64::from(w.polls).into(),
            lease_until.into(),
            now.into(),
            crate::store::to_i64("cluster", c.id)?.into(),
            owner.into(),
        ],
    )?;
    Ok(n == 1)
}

/// Takes over clusters with work to do whose lease ran out by `now`.
pub(crate) fn claim(tx: &mut dyn Tx, owner: &str, now: i64, until: i64) -> Result<Vec<EksWork>> {
    let rows = tx.query(
        &format!("SELECT {COLS} {FROM} WHERE c.lease_until < $1 ORDER BY c.id"),
        &[now.into()],
    )?;
    let mut claimed = Vec::new();
    for r in &rows {
        let w = work_row(r)?;
        if !w.cluster.state.is_active() {
            continue;
        }
        let n = tx.execute(
            "UPDATE eks_clusters SET lease_owner = $1, lease_until = $2 WHERE id = $3 AND lease_until < $4",
            &[
                owner.into(),
                until.into(),
                crate::store::to_i64("cluster", w.cluster.id)?.into(),
                now.into(),
            ],
        )?;
        if n == 1 {
            claimed.push(w);
        }
    }
    Ok(claimed)
}

pub(crate) fn get(tx: &mut dyn Tx, name: &str) -> Result<EksCluster> {
    Ok(by_name(tx, name)?.cluster)
}

pub(crate) fn list(tx: &mut dyn Tx) -> Result<Vec<EksCluster>> {
    tx.query(&format!("SELECT {COLS} {FROM} ORDER BY c.id"), &[])?
        .iter()
        .map(|r| work_row(r).map(|w| w.cluster))
        .collect()
}
