//! One audit record per proxied request: who (job, pipeline, project, environment,
//! user), through which agent and as whom, what (verb, path), and how it ended
//! (code, bytes, duration). Emitted when the response body ends or is dropped, so
//! bytes and duration cover the whole exchange.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

pub use kas_api::audit::RequestRecord as AuditRecord;

/// Receives audit records.
pub trait AuditSink: Send + Sync {
    fn record(&self, record: AuditRecord);
}

/// The Kubernetes verb of a request (as the API server's audit log names it).
pub fn verb(method: &str, path_and_query: &str) -> &'static str {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1" || kv == "watch");
    // Objects sit at an even number of segments after /api/v1 or /apis/<g>/<v>
    // (.../<resource>/<name>, .../namespaces/<ns>/<resource>/<name>).
    // Split as bytes: str's pattern search costs more than the few bytes of a path.
    let mut segs = path
        .as_bytes()
        .split(|b| *b == b'/')
        .filter(|s| !s.is_empty());
    let prefix = match segs.next() {
        Some(b"api") => 2,
        Some(b"apis") => 3,
        _ => 0,
    };
    // Counted, not collected: this runs for every proxied request.
    let rest = if prefix == 0 {
        0
    } else {
        (1 + segs.count()).saturating_sub(prefix)
    };
    let collection = rest % 2 == 1;
    match (method, collection) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "list",
        ("GET", false) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "deletecollection",
        ("DELETE", false) => "delete",
        ("HEAD", _) => "get",
        _ => "other",
    }
}

/// A response body that counts its bytes and hands the record to the sink when it
/// ends or is dropped.
pub struct AuditedBody<B> {
    inner: B,
    pending: Option<(AuditRecord, Arc<dyn AuditSink>, Instant)>,
    bytes: u64,
}

impl<B> AuditedBody<B> {
    pub fn new(inner: B, record: AuditRecord, sink: Arc<dyn AuditSink>, started: Instant) -> Self {
        AuditedBody {
            inner,
            pending: Some((record, sink, started)),
            bytes: 0,
        }
    }

    fn finish(&mut self, completed: bool) {
        if let Some((mut r, sink, started)) = self.pending.take() {
            r.bytes = self.bytes;
            r.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            r.completed = completed;
            sink.record(r);
        }
    }
}

impl<B> Drop for AuditedBody<B> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for AuditedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
                // HTTP servers stop polling once the body says it has ended.
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::verb;

    #[test]
    fn verbs() {
        assert_eq!(verb("GET", "/api/v1/pods"), "list");
        assert_eq!(verb("GET", "//api//v1/pods/"), "list");
        assert_eq!(verb("GET", "/apis/apps/v1/deployments/web?x=1"), "get");
        assert_eq!(verb("GET", "/healthz"), "get");
        assert_eq!(verb("GET", "/api/v1/namespaces/default/pods"), "list");
        assert_eq!(verb("GET", "/api/v1/namespaces/default/pods/web"), "get");
        assert_eq!(verb("GET", "/api/v1/namespaces"), "list");
        assert_eq!(verb("GET", "/api/v1/namespaces/default"), "get");
        assert_eq!(
            verb("GET", "/api/v1/namespaces/default/pods?watch=true"),
            "watch"
        );
        assert_eq!(
            verb("GET", "/apis/apps/v1/namespaces/x/deployments"),
            "list"
        );
        assert_eq!(
            verb("GET", "/apis/apps/v1/namespaces/x/deployments/web"),
            "get"
        );
        assert_eq!(
            verb("POST", "/api/v1/namespaces/default/configmaps"),
            "create"
        );
        assert_eq!(
            verb("PATCH", "/api/v1/namespaces/default/configmaps/a"),
            "patch"
        );
        assert_eq!(
            verb("DELETE", "/api/v1/namespaces/default/configmaps"),
            "deletecollection"
        );
        assert_eq!(
            verb("DELETE", "/api/v1/namespaces/default/configmaps/a"),
            "delete"
        );
    }
}
