//! The process heap as jemalloc (kas's allocator, the default `jemalloc` feature)
//! reports it, for `/metrics`, and its background purging.
//!
//! Without the feature (the system allocator, e.g. for heap profilers) there is
//! nothing to report and nothing to tune.

/// Heap figures in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes in live allocations.
    pub allocated: u64,
    /// Bytes in pages the allocator holds in memory (live allocations, its metadata,
    /// and freed pages not yet returned to the kernel).
    pub resident: u64,
}

/// The heap's figures now, if the allocator reports them.
#[cfg(feature = "jemalloc")]
pub fn stats() -> Option<HeapStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // jemalloc's statistics are a snapshot taken when the epoch advances.
    epoch::advance().ok()?;
    Some(HeapStats {
        allocated: stats::allocated::read().ok()? as u64,
        resident: stats::resident::read().ok()? as u64,
    })
}

#[cfg(not(feature = "jemalloc"))]
pub fn stats() -> Option<HeapStats> {
    None
}

/// Lets jemalloc return freed pages to the kernel from its own thread. Without it,
/// pages are returned only while the process allocates, so a kas whose agents sit
/// idle after a burst (a reconnect wave, a large stream) kept the burst's pages.
#[cfg(feature = "jemalloc")]
pub fn purge_in_background() {
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "cannot start the allocator's background purging");
    }
}

#[cfg(not(feature = "jemalloc"))]
pub fn purge_in_background() {}

#[cfg(all(test, feature = "jemalloc"))]
mod tests {
    // The test harness does not allocate with jemalloc, but the statistics of the
    // linked jemalloc still read (and grow with its own allocations).
    #[test]
    fn statistics_read() {
        let s = super::stats().expect("jemalloc statistics");
        assert!(s.resident >= s.allocated);
    }
}
