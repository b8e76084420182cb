//! Driving a busy future (a connection) together with quiet ones that watch it
//! (deadlines, shutdown signals), so that the quiet ones are polled only when they
//! woke the task themselves. In a `select!` every branch is polled on every wake, and a
//! connection's task wakes several times per request: polling its timer and its
//! cancellation tokens each time was about 1,400 instructions per proxied request in
//! kas.

use futures::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// Which of the two futures of [`first_of`] finished, with its output.
#[derive(Debug, PartialEq, Eq)]
pub enum First<A, B> {
    Busy(A),
    Quiet(B),
}

/// Where the quiet future's wakes go: noted, then passed on to the task.
#[derive(Default)]
struct Gate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Runs `busy` and `quiet` until either finishes: `busy` is polled on every wake of
/// the task, `quiet` once at first and then only after it woke the task.
pub fn first_of<'a, A: Future, B: Future>(
    busy: Pin<&'a mut A>,
    quiet: Pin<&'a mut B>,
) -> FirstOf<'a, A, B> {
    let gate = Arc::new(Gate {
        woken: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    FirstOf {
        busy,
        quiet,
        gate_waker: Waker::from(gate.clone()),
        gate,
    }
}

/// The future of [`first_of`] (a named type: an `async fn` over two borrowed futures
/// trips up the compiler's `Send` check for some of the futures it is used with).
pub struct FirstOf<'a, A, B> {
    busy: Pin<&'a mut A>,
    quiet: Pin<&'a mut B>,
    gate: Arc<Gate>,
    gate_waker: Waker,
}

impl<A: Future, B: Future> Future for FirstOf<'_, A, B> {
    type Output = First<A::Output, B::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is a pin or a handle, so the struct is Unpin.
        let this = &mut *self;
        if let Poll::Ready(out) = this.busy.as_mut().poll(cx) {
            return Poll::Ready(First::Busy(out));
        }
        // Registered before the flag is read, so a wake in between is not lost.
        this.gate.task.register(cx.waker());
        if this.gate.woken.swap(false, Ordering::AcqRel) {
            let mut quiet_cx = Context::from_waker(&this.gate_waker);
            if let Poll::Ready(out) = this.quiet.as_mut().poll(&mut quiet_cx) {
                return Poll::Ready(First::Quiet(out));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// A future that counts its polls and is never ready.
    struct Counting<'a>(&'a AtomicUsize);

    impl Future for Counting<'_> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_quiet_future_is_polled_only_when_it_woke_the_task() {
        let quiet_polls = AtomicUsize::new(0);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(1);
        let busy = async {
            let mut sum = 0;
            while let Some(v) = rx.recv().await {
                sum += v;
            }
            sum
        };
        let quiet = Counting(&quiet_polls);
        tokio::pin!(busy, quiet);
        let feed = async {
            for v in 1..=100 {
                tx.send(v).await.expect("send");
            }
            drop(tx);
        };
        let (out, ()) = tokio::join!(first_of(busy, quiet), feed);
        assert_eq!(out, First::Busy(5050));
        // Polled once at first; the hundred wakes were the busy future's.
        assert_eq!(quiet_polls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_future_that_wakes_the_task_finishes_it() {
        let busy = std::future::pending::<()>();
        let quiet = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            "deadline"
        };
        tokio::pin!(busy, quiet);
        let started = tokio::time::Instant::now();
        assert_eq!(first_of(busy, quiet).await, First::Quiet("deadline"));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
