//! A small bounded queue between tasks: the frames of one direction of a tunnel, or the
//! configurations pushed to one agent replica.
//!
//! tokio's `mpsc` allocates a block of 32 slots and its bookkeeping (about 1 KiB) per
//! channel when the channel is made; kas keeps one per idle tunnel of every connected
//! agent, idle for hours. This queue is one small allocation plus room for `capacity`
//! items, the latter made on the first send. Senders wait while it is full (that is the
//! backpressure towards whoever produces the frames); the receiver sees the end once
//! every sender is gone, and senders see that the receiver is gone.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

struct State<T> {
    items: VecDeque<T>,
    /// The receiver, waiting for an item (or the end).
    receiver: Option<Waker>,
    /// Senders waiting for room, or for the receiver to go.
    senders_waiting: Vec<Waker>,
    senders: usize,
    receiver_gone: bool,
}

struct Chan<T> {
    capacity: usize,
    state: Mutex<State<T>>,
}

impl<T> Chan<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Adds `cx`'s waker to `list` unless it is there already (a task polling again).
fn register(list: &mut Vec<Waker>, cx: &Context<'_>) {
    if !list.iter().any(|w| w.will_wake(cx.waker())) {
        list.push(cx.waker().clone());
    }
}

fn wake_all(list: Vec<Waker>) {
    for w in list {
        w.wake();
    }
}

/// The sending half; cloning adds a sender.
pub struct Sender<T> {
    chan: Arc<Chan<T>>,
}

/// The receiving half.
pub struct Receiver<T> {
    chan: Arc<Chan<T>>,
}

/// A queue holding at most `capacity` (at least 1) items.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let chan = Arc::new(Chan {
        capacity: capacity.max(1),
        state: Mutex::new(State {
            items: VecDeque::new(),
            receiver: None,
            senders_waiting: Vec::new(),
            senders: 1,
            receiver_gone: false,
        }),
    });
    (Sender { chan: chan.clone() }, Receiver { chan })
}

impl<T> Sender<T> {
    /// Queues `item`, waiting for room; gives it back if the receiver is gone.
    pub async fn send(&self, item: T) -> Result<(), T> {
        let mut item = Some(item);
        poll_fn(|cx| {
            let mut st = self.chan.lock();
            let Some(it) = item.take() else {
                return Poll::Ready(Ok(()));
            };
            if st.receiver_gone {
                return Poll::Ready(Err(it));
            }
            if st.items.len() < self.chan.capacity {
                st.items.push_back(it);
                let receiver = st.receiver.take();
                drop(st);
                if let Some(w) = receiver {
                    w.wake();
                }
                return Poll::Ready(Ok(()));
            }
            item = Some(it);
            register(&mut st.senders_waiting, cx);
            Poll::Pending
        })
        .await
    }

    /// Whether the receiver is gone.
    pub fn is_closed(&self) -> bool {
        self.chan.lock().receiver_gone
    }

    /// Returns once the receiver is gone.
    pub async fn closed(&self) {
        poll_fn(|cx| {
            let mut st = self.chan.lock();
            if st.receiver_gone {
                return Poll::Ready(());
            }
            register(&mut st.senders_waiting, cx);
            Poll::Pending
        })
        .await
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.chan.lock().senders += 1;
        Sender {
            chan: self.chan.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut st = self.chan.lock();
        st.senders -= 1;
        if st.senders == 0 {
            let receiver = st.receiver.take();
            drop(st);
            if let Some(w) = receiver {
                w.wake();
            }
        }
    }
}

impl<T> Receiver<T> {
    /// The next item; `None` once every sender is gone and the queue is empty.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut st = self.chan.lock();
        if let Some(item) = st.items.pop_front() {
            let waiting = std::mem::take(&mut st.senders_waiting);
            drop(st);
            wake_all(waiting);
            return Poll::Ready(Some(item));
        }
        if st.senders == 0 {
            return Poll::Ready(None);
        }
        if !st
            .receiver
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            st.receiver = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The next item; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut st = self.chan.lock();
        st.receiver_gone = true;
        let items = std::mem::take(&mut st.items);
        let waiting = std::mem::take(&mut st.senders_waiting);
        drop(st);
        // Queued items are dropped outside the lock (they may be large).
        drop(items);
        wake_all(waiting);
    }
}

impl<T> futures::Stream for Receiver<T> {
    type Item = T;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn items_arrive_in_order_and_the_end_follows_the_last_sender() {
        let (tx, mut rx) = channel(2);
        let tx2 = tx.clone();
        tx.send(1).await.expect("send");
        tx2.send(2).await.expect("send");
        drop(tx);
        drop(tx2);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_sender_wait_until_the_receiver_takes_one() {
        let (tx, mut rx) = channel(1);
        tx.send(1).await.expect("send");
        let mut second = Box::pin(tx.send(2));
        // Full: the second send does not complete.
        assert!(futures::poll!(second.as_mut()).is_pending());
        assert_eq!(rx.recv().await, Some(1));
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("woken when room was made")
            .expect("send");
        assert_eq!(rx.recv().await, Some(2));
    }

    #[tokio::test]
    async fn senders_learn_that_the_receiver_is_gone() {
        let (tx, rx) = channel(1);
        tx.send(1).await.expect("send");
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(2).await }
        });
        let closed = tokio::spawn({
            let tx = tx.clone();
            async move { tx.closed().await }
        });
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(waiting.await.expect("task"), Err(2));
        closed.await.expect("closed() returns");
        assert!(tx.is_closed());
        assert_eq!(tx.send(3).await, Err(3));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send_and_by_the_last_sender_leaving() {
        let (tx, mut rx) = channel::<u32>(1);
        let recv = tokio::spawn(async move {
            let first = rx.recv().await;
            let end = rx.recv().await;
            (first, end)
        });
        tokio::task::yield_now().await;
        tx.send(7).await.expect("send");
        drop(tx);
        assert_eq!(recv.await.expect("task"), (Some(7), None));
    }
}
