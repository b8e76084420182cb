//! What a listener counts (read by the metrics at scrape time) and how it keeps
//! repeated warnings from flooding the log.

use super::LOG_EVERY;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Why kas closed a connection (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Handshake,
    FirstRequest,
    Idle,
    MaxAge,
    Closed,
}

impl CloseReason {
    pub const ALL: [CloseReason; 5] = [
        CloseReason::Handshake,
        CloseReason::FirstRequest,
        CloseReason::Idle,
        CloseReason::MaxAge,
        CloseReason::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Handshake => "handshake_timeout",
            CloseReason::FirstRequest => "first_request_timeout",
            CloseReason::Idle => "idle_timeout",
            CloseReason::MaxAge => "max_age",
            CloseReason::Closed => "closed_by_kas",
        }
    }
}

/// Counts of one listener, read by the metrics at scrape time.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub(super) open: AtomicI64,
    pub(super) accepted: AtomicU64,
    pub(super) accept_errors: AtomicU64,
    pub(super) refused: AtomicU64,
    closed: [AtomicU64; 5],
}

/// A snapshot of [`ListenerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerCounts {
    pub open: i64,
    pub accepted: u64,
    pub accept_errors: u64,
    pub refused: u64,
    /// By [`CloseReason::ALL`] order.
    pub closed: [u64; 5],
}

impl ListenerStats {
    pub fn counts(&self) -> ListenerCounts {
        ListenerCounts {
            open: self.open.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            closed: std::array::from_fn(|i| self.closed[i].load(Ordering::Relaxed)),
        }
    }

    pub(super) fn count_close(&self, r: CloseReason) {
        let i = CloseReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.closed[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Logs a repeated warning at most once per [`LOG_EVERY`], saying how many were not
/// logged in between.
pub(super) struct RateLimitedLog {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    pub(super) fn new() -> Self {
        RateLimitedLog {
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns how many were suppressed since the last logged one, or `None` when this
    /// one is to be suppressed too.
    pub(super) fn admit(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(t) if t.elapsed() < LOG_EVERY => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(Instant::now());
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}
