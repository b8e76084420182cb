//! The audit trail: one JSON line per request through the Kubernetes API proxy, in a
//! file (default `<data dir>/audit.jsonl`) or on stdout, written by a background thread
//! so a slow disk never holds a request. `kasctl audit` reads the file back through
//! the admin API with filters.

use kas_k8s_proxy::audit::{AuditRecord, AuditSink};
use serde_json::Value;
use std::io::BufRead;
use std::io::Write;
use std::path::PathBuf;
use tokio::sync::mpsc;

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    File(PathBuf),
    Stdout,
}

/// The writer; see the module docs.
pub struct AuditLog {
    tx: mpsc::UnboundedSender<String>,
    pub target: AuditTarget,
}

impl AuditLog {
    /// Starts the writer thread.
    pub fn start(target: AuditTarget) -> AuditLog {
        AuditLog {
            tx: line_writer(target.clone(), "audit log"),
            target,
        }
    }
}

/// A background thread appending the lines it is sent to `target` (created 0600), so a
/// slow disk never holds the sender. Lines already queued when it wakes go out in one
/// write, so a busy proxy costs one system call per batch, not per line. Returns its input.
pub fn line_writer(target: AuditTarget, what: &'static str) -> mpsc::UnboundedSender<String> {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let run = move || {
        let mut out: Box<dyn Write> = match &target {
            AuditTarget::Stdout => Box::new(std::io::stdout()),
            AuditTarget::File(path) => {
                let mut opts = std::fs::OpenOptions::new();
                opts.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                match opts.open(path) {
                    Ok(f) => Box::new(f),
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot open the {what}; its records are lost");
                        return;
                    }
                }
            }
        };
        let mut batch = String::new();
        while let Some(line) = rx.blocking_recv() {
            batch.clear();
            batch.push_str(&line);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(line) => batch.push_str(&line),
                    Err(_) => break,
                }
            }
            if let Err(e) = out.write_all(batch.as_bytes()).and_then(|()| out.flush()) {
                tracing::error!(error = %e, "cannot write the {what}");
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("kas-line-writer".into())
        .spawn(run)
    {
        tracing::error!(error = %e, "cannot start the {what} writer; its records are lost");
    }
    tx
}

/// Upper bound of one write, so a backlog is written in pieces of bounded size.
const MAX_BATCH: usize = 1 << 20;

impl AuditSink for AuditLog {
    fn record(&self, record: AuditRecord) {
        match serde_json::to_string(&record) {
            Ok(mut line) => {
                line.push('\n');
                let _ = self.tx.send(line);
            }
            Err(e) => tracing::error!(error = %e, "cannot encode an audit record"),
        }
    }
}

/// Filters of `kasctl audit`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct AuditQuery {
    pub job: Option<u64>,
    pub project: Option<String>,
    pub agent: Option<u64>,
    /// Unix seconds.
    pub since: Option<f64>,
    /// The newest this many matches (default 1000).
    pub limit: Option<usize>,
}

/// Records from the audit file matching `q`, oldest first. Lines that are not
/// records (a torn last line) are skipped.
pub fn read(path: &std::path::Path, q: &AuditQuery) -> std::io::Result<Vec<Value>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let limit = q.limit.unwrap_or(1000).max(1);
    let mut out = std::collections::VecDeque::new();
    for line in std::io::BufReader::new(f).lines() {
        let Ok(v) = serde_json::from_str::<Value>(&line?) else {
            continue;
        };
        let keep = q.job.is_none_or(|j| v["job_id"].as_u64() == Some(j))
            && q.agent.is_none_or(|a| v["agent_id"].as_u64() == Some(a))
            && q.project.as_deref().is_none_or(|p| {
                v["project"]
                    .as_str()
                    .is_some_and(|vp| vp.eq_ignore_ascii_case(p.trim_matches('/')))
            })
            && q.since
                .is_none_or(|s| v["time"].as_f64().is_some_and(|t| t >= s));
        if keep {
            if out.len() == limit {
                out.pop_front();
            }
            out.push_back(v);
        }
    }
    Ok(out.into())
}
