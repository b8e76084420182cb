//! Process set-up shared by the `kas` and `agentk` binaries: logging (a level filter,
//! text or JSON lines on stderr, written by a background thread so a request never
//! waits on the write), the batched line writer that thread is (also used for kas's
//! audit trail), and the tokio runtime. It does not define what is logged.

pub mod batch;

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
/// `kas_server=debug`) wins over `RUST_LOG`; the default is `info`. Keep the returned
/// guard alive for the life of the process: dropping it flushes pending lines.
pub fn init(level: Option<&str>, format: &str) -> Result<batch::Flush, LogError> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| LogError::Level {
            level: l.to_string(),
            message: e.to_string(),
        })?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
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
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
    Ok(guard)
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
