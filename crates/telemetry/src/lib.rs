//! Process set-up shared by the `kas` and `agentk` binaries: logging (a level filter,
//! text or JSON lines on stderr, written by a background thread so a request never
//! waits on the write), the batched line writer that thread is (also used for kas's
//! audit trail), and the tokio runtime with one helper for tasks that drive a connection
//! ([`quiet::first_of`]). It does not define what is logged.

pub mod batch;
mod json;
pub mod quiet;
mod text;

pub use json::{needs_escape, PlainJson};
pub use text::PlainText;

/// A bad logging setting.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--log-format must be text or json, not `{0}`")]
    Format(String),
    #[error("invalid log level `{level}`: {message}")]
    Level { level: String, message: String },
    #[error("cannot start the log writer thread: {0}")]
    Thread(std::io::Error),
}

/// Installs the global subscriber. `level` (a filter like `info` or
/// `kas=debug`) wins over `RUST_LOG`; the default is `info`. Keep the returned
/// guard alive for the life of the process: dropping it flushes pending lines. The
/// [`LogLevel`] changes the filter later (agentk applies its configuration's levels).
pub fn init(level: Option<&str>, format: &str) -> Result<(batch::Flush, LogLevel), LogError> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{fmt, reload};
    let mut initial = match level {
        Some(l) => l.to_string(),
        None => std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    };
    let filter = match parse_filter(&initial) {
        Ok(f) => f,
        // A bad RUST_LOG falls back to info; a bad flag is the operator's to fix.
        Err(_) if level.is_none() => {
            initial = "info".into();
            parse_filter(&initial)?
        }
        Err(e) => return Err(e),
    };
    if !matches!(format, "text" | "json") {
        return Err(LogError::Format(format.to_string()));
    }
    let (writer, guard) = batch::start(
        "log-writer",
        Box::new(std::io::stderr()),
        // Nowhere left to report it but stderr itself, which is what failed.
        Box::new(|_| {}),
    )
    .map_err(LogError::Thread)?;
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = fmt::layer().with_writer(writer).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    if format == "json" {
        // The same object, cheaper (see `json`).
        registry
            .with(layer.json().event_format(PlainJson::default()))
            .init();
    } else if ansi {
        registry.with(layer).init();
    } else {
        // The same line, cheaper (see `text`): kas writes one per proxied request.
        registry.with(layer.event_format(PlainText)).init();
    }
    Ok((guard, LogLevel { handle, initial }))
}

fn parse_filter(f: &str) -> Result<tracing_subscriber::EnvFilter, LogError> {
    tracing_subscriber::EnvFilter::try_new(f).map_err(|e| LogError::Level {
        level: f.to_string(),
        message: e.to_string(),
    })
}

/// Changes the process's log filter while it runs.
#[derive(Clone)]
pub struct LogLevel {
    handle: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
    /// The filter the process started with.
    initial: String,
}

impl LogLevel {
    /// Replaces the filter (e.g. `debug,h2=error`).
    pub fn set(&self, filter: &str) -> Result<(), LogError> {
        let f = parse_filter(filter)?;
        self.handle.reload(f).map_err(|e| LogError::Level {
            level: filter.to_string(),
            message: e.to_string(),
        })
    }

    /// Goes back to the filter the process started with.
    pub fn reset(&self) -> Result<(), LogError> {
        let initial = self.initial.clone();
        self.set(&initial)
    }
}

/// The tokio runtime for `--worker-threads`: 0 = one worker per core, 1 = everything
/// on the calling thread (no cross-thread wake-ups), n = n workers.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if worker_threads > 1 {
        b.worker_threads(worker_threads);
    }
    b.enable_all().build()
}
