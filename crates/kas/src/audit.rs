//! The audit trail: one JSON line per request through the Kubernetes API proxy, in a
//! file (default `<data dir>/audit.jsonl`) or on stdout, written by a background thread
//! so a slow disk never holds a request. `kasctl audit` reads the file back through
//! the admin API with filters.

use kas_api::audit::{AdminRecord, AuditEntry, AuditQuery};
use kas_k8s_proxy::audit::{AuditRecord, AuditSink};
use kas_telemetry::batch::{self, Batched, Flush};
use std::io::BufRead;
use std::io::Write;
use std::path::PathBuf;

/// Bytes reserved for one audit line (a request record with an impersonated identity
/// is about 400).
const LINE_CAPACITY: usize = 512;

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    File(PathBuf),
    Stdout,
}

/// The writer; see the module docs.
pub struct AuditLog {
    out: Batched,
    pub target: AuditTarget,
}

impl AuditLog {
    /// Starts the writer thread. Keep the `Flush` until shutdown: dropping it writes
    /// the records still queued.
    pub fn start(target: AuditTarget) -> (AuditLog, Option<Flush>) {
        let (out, flush) = line_writer(&target, "audit log");
        (AuditLog { out, target }, flush)
    }
}

/// A background thread appending the lines it is given to `target` (created 0600), so a
/// slow disk never holds a request: lines collect for a few milliseconds and go out in
/// one write (`kas_telemetry::batch`). If the file cannot be opened or the thread cannot
/// start, the error is logged and the lines are dropped.
pub fn line_writer(target: &AuditTarget, what: &'static str) -> (Batched, Option<Flush>) {
    let out: Box<dyn Write + Send> = match target {
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
                    Box::new(std::io::sink())
                }
            }
        }
    };
    let on_error = Box::new(move |e: &std::io::Error| {
        tracing::error!(error = %e, "cannot write the {what}");
    });
    match batch::start("kas-line-writer", out, on_error) {
        Ok((out, flush)) => (out, Some(flush)),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the {what} writer; its records are lost");
            (Batched::discarding(), None)
        }
    }
}

impl AuditLog {
    /// The file records go to, unless they go to stdout.
    pub fn file(&self) -> Option<&PathBuf> {
        match &self.target {
            AuditTarget::File(p) => Some(p),
            AuditTarget::Stdout => None,
        }
    }

    /// Writes one admin action.
    pub fn record_admin(&self, r: &AdminRecord) {
        self.write(r);
    }

    fn write(&self, r: &impl serde::Serialize) {
        // Room for a typical record up front: growing the line as it is written
        // reallocated it several times per proxied request.
        let mut line = Vec::with_capacity(LINE_CAPACITY);
        match serde_json::to_writer(&mut line, r) {
            Ok(()) => {
                line.push(b'\n');
                self.out.append(&line);
            }
            Err(e) => tracing::error!(error = %e, "cannot encode an audit record"),
        }
    }
}

impl AuditSink for AuditLog {
    fn record(&self, record: AuditRecord) {
        self.write(&record);
    }
}

/// Records from the audit file matching `q`, oldest first. Lines that are not
/// records (a torn last line) are skipped.
pub fn read(path: &std::path::Path, q: &AuditQuery) -> std::io::Result<Vec<AuditEntry>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let limit = q.limit.unwrap_or(1000).max(1);
    let mut out = std::collections::VecDeque::new();
    for line in std::io::BufReader::new(f).lines() {
        let Ok(v) = serde_json::from_str::<AuditEntry>(&line?) else {
            continue;
        };
        let keep = v.matches(q);
        if keep {
            if out.len() == limit {
                out.pop_front();
            }
            out.push_back(v);
        }
    }
    Ok(out.into())
}
