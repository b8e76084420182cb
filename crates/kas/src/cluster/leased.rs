//! What managed applications and EKS clusters share: background work that one kas holds
//! under a lease in the control plane, renewed as it goes, and that any kas takes over
//! once the lease runs out.

use kas_api::clock::unix_secs;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

/// How long a lease lasts unless renewed.
pub(crate) const LEASE: Duration = Duration::from_secs(15);

/// When a lease taken or renewed now runs out (unix seconds).
pub(crate) fn lease_until() -> i64 {
    i64::try_from(unix_secs() + LEASE.as_secs()).unwrap_or(i64::MAX)
}

/// This kas, as a lease owner.
pub(crate) fn new_owner() -> String {
    format!("kas-{:016x}", rand::random::<u64>())
}

type TaskMap<K> = Mutex<HashMap<K, AbortOnDropHandle<()>>>;

/// Running work by key; each leaves the set when it ends, and dropping the set (or
/// [`Tasks::take_all`]) aborts what still runs.
pub(crate) struct Tasks<K>(Arc<TaskMap<K>>);

impl<K: Eq + Hash + Clone + Send + 'static> Tasks<K> {
    pub(crate) fn new() -> Self {
        Tasks(Arc::new(Mutex::new(HashMap::new())))
    }

    pub(crate) fn spawn(&self, key: K, work: impl Future<Output = ()> + Send + 'static) {
        let (set, k) = (Arc::downgrade(&self.0), key.clone());
        let task = tokio::spawn(async move {
            work.await;
            if let Some(set) = set.upgrade() {
                set.lock().unwrap_or_else(|p| p.into_inner()).remove(&k);
            }
        });
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, AbortOnDropHandle::new(task));
    }

    /// Aborts every running task; their keys.
    pub(crate) fn take_all(&self) -> Vec<K> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.drain().map(|(k, _)| k).collect()
    }
}

/// Runs `claim` every third of a lease (the first time at once) while `owner` lives
/// and the returned handle is kept.
pub(crate) fn claim_periodically<T, F, Fut>(owner: &Arc<T>, mut claim: F) -> AbortOnDropHandle<()>
where
    T: Send + Sync + 'static,
    F: FnMut(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let owner = Arc::downgrade(owner);
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut tick = tokio::time::interval(LEASE / 3);
        loop {
            tick.tick().await;
            let Some(owner) = owner.upgrade() else { return };
            claim(owner).await;
        }
    }))
}
