//! `kasctl audit`.

use crate::cli::AuditArgs;
use crate::client::AdminClient;
use crate::output::{since, table, Out};
use anyhow::{bail, Result};
use kas_api::audit::{AdminRecord, AuditEntry, AuditQuery, RequestRecord};
use kas_api::clock::unix_secs;

pub async fn audit(api: &AdminClient, a: AuditArgs, out: Out) -> Result<()> {
    let q = AuditQuery {
        kind: a.kind,
        job: a.job,
        project: a.project,
        agent: a.agent,
        since: a.since.as_deref().map(parse_since).transpose()?,
        limit: Some(a.limit),
    };
    out.show(&api.audit(&q).await?, |list| {
        table(
            &[
                "TIME", "KIND", "WHO", "JOB", "PROJECT", "ENV", "AGENT", "AS", "IDENTITY",
                "ACTION", "TARGET", "CODE", "BYTES", "MS",
            ],
            list.iter()
                .map(|e| match e {
                    AuditEntry::Admin(r) => admin_row(r),
                    AuditEntry::Request(r) => request_row(r),
                })
                .collect(),
        )
    })
}

fn dash(v: &Option<impl ToString>) -> String {
    v.as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| "-".into())
}

fn admin_row(r: &AdminRecord) -> Vec<String> {
    vec![
        since(r.time as u64),
        "admin".into(),
        dash(&r.actor),
        dash(&r.job_id),
        dash(&r.project),
        "-".into(),
        dash(&r.agent_id),
        "-".into(),
        "-".into(),
        r.action.clone().unwrap_or_else(|| r.method.clone()),
        r.target.clone().unwrap_or_else(|| r.path.clone()),
        r.code.to_string(),
        "-".into(),
        "-".into(),
    ]
}

fn request_row(r: &RequestRecord) -> Vec<String> {
    vec![
        since(r.time as u64),
        "request".into(),
        r.user.clone(),
        r.job_id.to_string(),
        r.project.clone(),
        dash(&r.environment),
        r.agent_id.to_string(),
        r.access_as.clone(),
        r.impersonated
            .as_ref()
            .map(|i| i.username.clone())
            .unwrap_or_else(|| "(agent)".into()),
        r.verb.clone(),
        r.path.clone(),
        r.code.to_string(),
        r.bytes.to_string(),
        format!("{:.1}", r.duration_ms),
    ]
}

/// `--since`: a duration ago (`30s`, `15m`, `2h`, `7d`) or unix seconds.
fn parse_since(v: &str) -> Result<f64> {
    if let Ok(n) = v.parse::<u64>() {
        return Ok(n as f64);
    }
    let bad = || format!("--since `{v}`: use 30s, 15m, 2h, 7d or unix seconds");
    let d = match humantime::parse_duration(v) {
        Ok(d) => d,
        Err(_) => bail!(bad()),
    };
    Ok(unix_secs().saturating_sub(d.as_secs()) as f64)
}
