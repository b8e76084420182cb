//! `kasctl access explain`.

use crate::cli::AccessCmd;
use crate::client::AdminClient;
use crate::output::Out;
use anyhow::Result;
use kas_api::admin::{ExplainQuery, Explanation};
use std::fmt::Write;

pub async fn access(api: &AdminClient, cmd: AccessCmd, out: Out) -> Result<()> {
    let AccessCmd::Explain {
        project,
        environment,
        agent,
        user,
        job_id,
        pipeline_id,
        protected,
    } = cmd;
    let q = ExplainQuery {
        project,
        environment,
        agent,
        user: Some(user),
        job_id: Some(job_id),
        pipeline_id: Some(pipeline_id),
        protected,
    };
    out.show(&api.explain(&q).await?, |e| print!("{}", explain_text(e)))
}

/// An explanation as text.
fn explain_text(e: &Explanation) -> String {
    let job = &e.job;
    let env = job
        .environment
        .as_ref()
        .map(|e| format!(", environment {e}"))
        .unwrap_or_default();
    let mut out = format!(
        "jobs of {}{env} -> agent {} ({})\n",
        job.project, e.agent.context, e.agent.id
    );
    if !e.allowed {
        let reason = e.reason.as_deref().unwrap_or_default();
        let _ = writeln!(out, "allowed:     no\nreason:      {reason}");
        return out;
    }
    let field = |v: &Option<String>| v.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "allowed:     yes\ndecided by:  {}",
        field(&e.decided_by)
    );
    let _ = writeln!(out, "access_as:   {}", field(&e.access_as));
    if let Some(ns) = &e.default_namespace {
        let _ = writeln!(out, "namespace:   {ns}");
    }
    match &e.identity {
        None => out.push_str("identity:    the agent's own (no impersonation)\n"),
        Some(i) => {
            let _ = writeln!(
                out,
                "identity:    user {} (for job {} of pipeline {}, run by {})",
                i.username, job.job_id, job.pipeline_id, job.user
            );
            if let Some(uid) = &i.uid {
                let _ = writeln!(out, "  uid:       {uid}");
            }
            for g in &i.groups {
                let _ = writeln!(out, "  group:     {g}");
            }
            for (k, vals) in &i.extra {
                let _ = writeln!(out, "  extra:     {k} = {}", vals.join(", "));
            }
        }
    }
    out
}
