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
        self.append_line(|line| serde_json::to_writer(line, r));
    }

    /// Appends the line `encode` writes.
    fn append_line(&self, encode: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>) {
        // Room for a typical record up front: growing the line as it is written
        // reallocated it several times per proxied request.
        let mut line = Vec::with_capacity(LINE_CAPACITY);
        match encode(&mut line) {
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
        self.append_line(|line| encode_request(&record, line));
    }
}

/// A request record as the JSON object `serde_json` writes for it, byte for byte, with
/// less work: the keys are literals and strings with nothing to escape are copied as
/// they are (serde_json escapes every key and string byte by byte, which was most of
/// the cost of a proxied request's audit line).
fn encode_request(r: &AuditRecord, out: &mut Vec<u8>) -> serde_json::Result<()> {
    out.extend_from_slice(b"{\"time\":");
    json(out, &r.time)?;
    out.extend_from_slice(b",\"request_id\":");
    string(out, &r.request_id)?;
    out.extend_from_slice(b",\"job_id\":");
    json(out, &r.job_id)?;
    out.extend_from_slice(b",\"pipeline_id\":");
    json(out, &r.pipeline_id)?;
    out.extend_from_slice(b",\"project\":");
    string(out, &r.project)?;
    out.extend_from_slice(b",\"environment\":");
    match &r.environment {
        Some(e) => string(out, e)?,
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"user\":");
    string(out, &r.user)?;
    out.extend_from_slice(b",\"agent_id\":");
    json(out, &r.agent_id)?;
    out.extend_from_slice(b",\"access_as\":");
    string(out, &r.access_as)?;
    out.extend_from_slice(b",\"impersonated\":");
    json(out, &r.impersonated)?;
    out.extend_from_slice(b",\"verb\":");
    string(out, &r.verb)?;
    out.extend_from_slice(b",\"path\":");
    string(out, &r.path)?;
    out.extend_from_slice(b",\"code\":");
    json(out, &r.code)?;
    out.extend_from_slice(b",\"bytes\":");
    json(out, &r.bytes)?;
    out.extend_from_slice(b",\"duration_ms\":");
    json(out, &r.duration_ms)?;
    out.extend_from_slice(if r.completed {
        b",\"completed\":true}"
    } else {
        b",\"completed\":false}"
    });
    Ok(())
}

/// A JSON string: copied between quotes when nothing in it needs escaping, else
/// escaped by serde_json.
fn string(out: &mut Vec<u8>, s: &str) -> serde_json::Result<()> {
    if !kas_telemetry::needs_escape(s.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(out, s)
    }
}

/// A number, `null` or an object: written by serde_json (nothing to escape in the first
/// two; the impersonated identity is rare enough).
fn json<T: serde::Serialize>(out: &mut Vec<u8>, v: &T) -> serde_json::Result<()> {
    serde_json::to_writer(out, v)
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

#[cfg(test)]
mod tests {
    use super::*;
    use kas_api::Identity;

    fn record() -> AuditRecord {
        AuditRecord {
            time: 1_796_544_372.115_150_2,
            request_id: "00ab34cd56ef7890".into(),
            job_id: 41,
            pipeline_id: 7,
            project: "group/project".into(),
            environment: None,
            user: "root".into(),
            agent_id: 3,
            access_as: "ci_job".into(),
            impersonated: None,
            verb: "list".into(),
            path: "/api/v1/namespaces/default/pods".into(),
            code: 200,
            bytes: 133,
            duration_ms: 0.348,
            completed: true,
        }
    }

    fn same_as_serde(r: &AuditRecord) {
        let mut ours = Vec::new();
        encode_request(r, &mut ours).expect("encode");
        let theirs = serde_json::to_vec(r).expect("serde");
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs)
        );
        // Numbers that are not finite become null, which no record reads back from.
        if r.time.is_finite() && r.duration_ms.is_finite() {
            let back: AuditRecord = serde_json::from_slice(&ours).expect("parses back");
            assert_eq!(&back, r);
        }
    }

    #[test]
    fn request_lines_are_what_serde_json_writes() {
        same_as_serde(&record());
        let mut r = record();
        r.environment = Some("production".into());
        r.user = "quote \" backslash \\ newline \n tab \t bell \u{7} del \u{7f} é ☃".into();
        r.path = "/api/v1/namespaces/x/configmaps/a\"b".into();
        r.impersonated = Some(Identity {
            username: "gitlab:ci_job:41".into(),
            uid: Some("u\"1".into()),
            groups: vec!["gitlab:ci_job".into(), "gitlab:project:2".into()],
            extra: [("agent.gitlab.com/id".to_string(), vec!["3".to_string()])]
                .into_iter()
                .collect(),
        });
        r.code = 0;
        r.bytes = u64::MAX;
        r.duration_ms = f64::NAN;
        r.time = 0.0;
        r.completed = false;
        same_as_serde(&r);
        r.duration_ms = 1e-7;
        r.time = f64::INFINITY;
        r.request_id = String::new();
        same_as_serde(&r);
        r.time = 1.5;
        same_as_serde(&r);
    }
}
