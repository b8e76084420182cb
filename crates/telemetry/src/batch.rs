//! A line writer that keeps the request path free of wake-ups: callers append bytes to a
//! shared buffer under a short lock, and a background thread writes what has collected
//! every few milliseconds. While lines keep coming the producers never signal the writer
//! (a channel would wake a parked thread for every line, which cost a request about
//! 10 us per log and audit line on a busy 2-core machine); only a writer that has seen
//! nothing for a while parks, and then the next line wakes it at once.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long lines may collect before they are written.
const INTERVAL: Duration = Duration::from_millis(5);
/// Empty rounds after which the writer parks until the next line (100 ms).
const PARK_AFTER: u32 = 20;
/// A buffer that grew beyond this during a burst is given back afterwards.
const KEEP_CAPACITY: usize = 1 << 20;

/// What is done with a write error (the writer cannot log through itself).
pub type OnError = Box<dyn Fn(&std::io::Error) + Send>;

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    parked: bool,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only bytes behind; keep using them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }
}

/// The producer side; cheap to clone. Each `append` lands whole and in order.
#[derive(Clone)]
pub struct Batched {
    shared: Arc<Shared>,
    // Closes the writer when the last producer is gone, as a channel would.
    _last: Arc<CloseOnDrop>,
}

struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Batched {
    /// A producer with no writer behind it: what it is given is dropped.
    pub fn discarding() -> Batched {
        let shared = Arc::new(Shared::default());
        shared.close();
        Batched {
            _last: Arc::new(CloseOnDrop(shared.clone())),
            shared,
        }
    }

    /// Queues `bytes` (normally whole lines) for the writer. Once the writer has
    /// stopped (its `Flush` dropped) nothing would write them, so they are dropped.
    pub fn append(&self, bytes: &[u8]) {
        let mut s = self.shared.lock();
        if s.closed {
            return;
        }
        s.buf.extend_from_slice(bytes);
        if s.parked {
            s.parked = false;
            drop(s);
            self.shared.wake.notify_one();
        }
    }
}

impl std::fmt::Debug for Batched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batched").finish_non_exhaustive()
    }
}

/// `std::io::Write` for `tracing_subscriber`'s formatter, which writes each event with
/// one `write_all` of the whole line.
impl Write for Batched {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Batched {
    type Writer = Batched;

    fn make_writer(&'a self) -> Batched {
        self.clone()
    }
}

/// Dropping it writes everything queued so far and stops the writer thread, so keep it
/// alive for as long as lines matter (the life of the process).
pub struct Flush {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.shared.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a writer thread named `name` that writes to `out`; see the module docs.
pub fn start(
    name: &str,
    mut out: Box<dyn Write + Send>,
    on_error: OnError,
) -> std::io::Result<(Batched, Flush)> {
    let shared = Arc::new(Shared::default());
    let writer = shared.clone();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let mut batch = Vec::new();
            let mut empty_rounds = 0u32;
            loop {
                let closed = {
                    let mut s = writer.lock();
                    if s.buf.is_empty() && !s.closed && empty_rounds >= PARK_AFTER {
                        s.parked = true;
                        while s.parked && !s.closed {
                            s = writer.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                        }
                        s.parked = false;
                        empty_rounds = 0;
                    }
                    std::mem::swap(&mut s.buf, &mut batch);
                    s.closed
                };
                if batch.is_empty() {
                    if closed {
                        return;
                    }
                    empty_rounds += 1;
                } else {
                    empty_rounds = 0;
                    if let Err(e) = out.write_all(&batch).and_then(|()| out.flush()) {
                        on_error(&e);
                    }
                    batch.clear();
                    if batch.capacity() > KEEP_CAPACITY {
                        batch = Vec::new();
                    }
                }
                if !closed {
                    // Woken early only by `close`; producers never signal a running writer.
                    let s = writer.lock();
                    if !s.closed {
                        let _ = writer.wake.wait_timeout(s, INTERVAL);
                    }
                }
            }
        })?;
    let producer = Batched {
        _last: Arc::new(CloseOnDrop(shared.clone())),
        shared: shared.clone(),
    };
    Ok((
        producer,
        Flush {
            shared,
            thread: Some(thread),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn writer() -> (Sink, Batched, Flush) {
        let sink = Sink::default();
        let (b, f) =
            start("test-writer", Box::new(sink.clone()), Box::new(|_| {})).expect("start writer");
        (sink, b, f)
    }

    #[test]
    fn dropping_the_flush_guard_writes_every_line_in_order() {
        let (sink, b, flush) = writer();
        for i in 0..10_000 {
            b.append(format!("line {i}\n").as_bytes());
        }
        drop(flush);
        let text = String::from_utf8(sink.0.lock().expect("sink lock").clone()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10_000);
        assert!(lines
            .iter()
            .enumerate()
            .all(|(i, l)| *l == format!("line {i}")));
    }

    #[test]
    fn lines_from_many_threads_stay_whole() {
        let (sink, b, flush) = writer();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        b.append(format!("thread {t} line {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("producer thread");
        }
        drop(flush);
        let text = String::from_utf8(sink.0.lock().expect("sink lock").clone()).expect("utf-8");
        assert_eq!(text.lines().count(), 4000);
        assert!(text
            .lines()
            .all(|l| l.starts_with("thread ") && l.split(' ').count() == 4));
    }

    #[test]
    fn a_parked_writer_wakes_for_the_next_line() {
        let (sink, b, _flush) = writer();
        // Let the writer run out of work and park (PARK_AFTER empty rounds).
        let parked = || b.shared.lock().parked;
        eventually(parked);
        b.append(b"after a pause\n");
        eventually(|| sink.0.lock().expect("sink lock").as_slice() == b"after a pause\n");
    }

    #[test]
    fn the_last_producer_gone_ends_the_writer_after_writing() {
        let (sink, b, flush) = writer();
        b.append(b"last words\n");
        drop(b);
        // The thread ends on its own once the producers are gone.
        eventually(|| flush.thread.as_ref().is_some_and(|t| t.is_finished()));
        assert_eq!(
            sink.0.lock().expect("sink lock").as_slice(),
            b"last words\n"
        );
    }

    fn eventually(mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "condition not reached in 10 s"
            );
            std::thread::yield_now();
        }
    }
}
