//! The runtimes connections are served on: one single-threaded tokio runtime per
//! worker thread, each accepted connection (with every task it spawns: HTTP/2 streams,
//! a proxied request's tunnel exchange) on one of them, taken in turn.
//!
//! A work-stealing runtime wakes an idle worker whenever a task becomes ready, so a
//! small request bounced between threads several times (futex wake-ups and context
//! switches); kas spent about a third of its CPU per proxied request on that
//! (docs/benchmarks.md). Here a connection's work stays on its thread; only a request
//! whose agent connection lives on another runtime crosses once each way.
//!
//! The accept loops and kas's background work stay on the runtime kas was started on.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// N single-threaded runtimes, each on its own thread until this is dropped (then
/// each stops, dropping the tasks it still holds).
pub struct ConnRuntimes {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Dropping these ends the threads' `block_on`.
    _stop: Vec<oneshot::Sender<()>>,
}

impl std::fmt::Debug for ConnRuntimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnRuntimes")
            .field("threads", &self.handles.len())
            .finish()
    }
}

impl ConnRuntimes {
    /// Starts `threads` runtimes (at least one), named `<name>-<i>`.
    pub fn start(name: &str, threads: usize) -> std::io::Result<ConnRuntimes> {
        let threads = threads.max(1);
        let mut handles = Vec::with_capacity(threads);
        let mut stop = Vec::with_capacity(threads);
        for i in 0..threads {
            let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        let _ = stop_rx.await;
                    });
                })?;
            let handle = handle_rx.recv().map_err(|_| {
                std::io::Error::other("a connection runtime thread ended while starting")
            })??;
            handles.push(handle);
            stop.push(stop_tx);
        }
        Ok(ConnRuntimes {
            handles,
            next: AtomicUsize::new(0),
            _stop: stop,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.handles.len()
    }

    /// The runtime the next connection goes to (each in turn).
    fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// Runs `f` on the next runtime.
    pub fn spawn<F>(&self, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        drop(self.next().spawn(f));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_to_each_runtime_in_turn_and_stay_on_its_thread() {
        let rts = ConnRuntimes::start("test-conn", 2).expect("runtimes");
        assert_eq!(rts.len(), 2);
        let mut threads = Vec::new();
        for _ in 0..4 {
            let (tx, rx) = oneshot::channel();
            rts.spawn(async move {
                let before = std::thread::current().id();
                // A task spawned from a connection's task runs on the same thread.
                let inner = tokio::spawn(async { std::thread::current().id() })
                    .await
                    .expect("inner task");
                let _ = tx.send((before, inner));
            });
            let (outer, inner) = rx.await.expect("task ran");
            assert_eq!(outer, inner);
            threads.push(outer);
        }
        assert_ne!(threads[0], threads[1]);
        assert_eq!(threads[0], threads[2]);
        assert_eq!(threads[1], threads[3]);
        assert_ne!(threads[0], std::thread::current().id());
    }

    #[tokio::test]
    async fn dropping_stops_the_threads_and_their_tasks() {
        let rts = ConnRuntimes::start("test-conn", 1).expect("runtimes");
        let (tx, rx) = oneshot::channel::<()>();
        let (held_tx, held_rx) = oneshot::channel::<()>();
        rts.spawn(async move {
            let _tx = tx;
            let _ = held_tx.send(());
            std::future::pending::<()>().await;
        });
        held_rx.await.expect("task started");
        drop(rts);
        // The pending task was dropped with its runtime: its sender is gone.
        assert!(rx.await.is_err());
    }
}
