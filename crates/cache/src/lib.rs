//! A reactive cache: callers (web handlers) never wait on a slow source such as a
//! cluster. [`ReactiveCache::get`] answers at once with the cached value or "not ready
//! yet"; a background task computes missing values, refreshes those older than the
//! TTL, stops refreshing keys nobody asked for within `idle` (and forgets them), and
//! never serves a value older than `max_stale`.
//!
//! Used by the application client library and by kas's agents page. It knows nothing
//! of what it caches: values and errors are the caller's types.
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;
// tokio's clock, so tests can pause and advance it.
use tokio::time::Instant;

/// Timing of a [`ReactiveCache`].
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// A value is refreshed once it is this old.
    pub ttl: Duration,
    /// A value older than this is not served (refreshes keep failing).
    pub max_stale: Duration,
    /// A key nobody asked for during this long is no longer refreshed, and dropped.
    pub idle: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            ttl: Duration::from_secs(30),
            max_stale: Duration::from_secs(300),
            idle: Duration::from_secs(600),
        }
    }
}

/// What [`ReactiveCache::get`] answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Cached<V, E> {
    /// A value and how old it is.
    Ready { value: Arc<V>, age: Duration },
    /// Being computed; ask again later.
    NotReady,
    /// The last computation failed and there is no fresh enough value.
    Failed(E),
}

struct Entry<V, E> {
    value: Option<(Arc<V>, Instant)>,
    error: Option<E>,
    last_asked: Instant,
    loading: bool,
}

type Loader<K, V, E> = Arc<dyn Fn(K) -> BoxFuture<'static, Result<V, E>> + Send + Sync>;

struct Inner<K, V, E> {
    entries: Mutex<HashMap<K, Entry<V, E>>>,
    loader: Loader<K, V, E>,
    opts: CacheOptions,
}

/// See the module docs. Cloning shares the cache; the refresher stops when the last
/// clone is dropped.
pub struct ReactiveCache<K, V, E> {
    inner: Arc<Inner<K, V, E>>,
    _refresher: Arc<AbortOnDropHandle<()>>,
}

impl<K, V, E> Clone for ReactiveCache<K, V, E> {
    fn clone(&self) -> Self {
        ReactiveCache {
            inner: self.inner.clone(),
            _refresher: self._refresher.clone(),
        }
    }
}

impl<K, V, E> ReactiveCache<K, V, E>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    /// A cache computing values with `loader`. Must be called inside a tokio runtime.
    pub fn new<F>(opts: CacheOptions, loader: F) -> Self
    where
        F: Fn(K) -> BoxFuture<'static, Result<V, E>> + Send + Sync + 'static,
    {
        let inner = Arc::new(Inner {
            entries: Mutex::new(HashMap::new()),
            loader: Arc::new(loader),
            opts,
        });
        let weak = Arc::downgrade(&inner);
        let task = tokio::spawn(refresh_loop(weak));
        ReactiveCache {
            inner,
            // Dropping the last handle stops the refresher.
            _refresher: Arc::new(AbortOnDropHandle::new(task)),
        }
    }

    /// The cached value, at once; starts computing it if nobody did yet.
    pub fn get(&self, key: &K) -> Cached<V, E> {
        let now = Instant::now();
        let mut entries = self.inner.lock();
        let entry = entries.entry(key.clone()).or_insert_with(|| Entry {
            value: None,
            error: None,
            last_asked: now,
            loading: false,
        });
        entry.last_asked = now;
        let fresh_enough = entry
            .value
            .as_ref()
            .filter(|(_, at)| now.duration_since(*at) <= self.inner.opts.max_stale)
            .map(|(v, at)| (v.clone(), now.duration_since(*at)));
        let needs_load = !entry.loading
            && entry
                .value
                .as_ref()
                .is_none_or(|(_, at)| now.duration_since(*at) >= self.inner.opts.ttl);
        let error = entry.error.clone();
        if needs_load {
            entry.loading = true;
        }
        drop(entries);
        if needs_load {
            spawn_load(&self.inner, key.clone());
        }
        match (fresh_enough, error) {
            (Some((value, age)), _) => Cached::Ready { value, age },
            (None, Some(e)) => Cached::Failed(e),
            (None, None) => Cached::NotReady,
        }
    }

    /// Keys currently held (asked for within `idle`).
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K, V, E> Inner<K, V, E> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Entry<V, E>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn spawn_load<K, V, E>(inner: &Arc<Inner<K, V, E>>, key: K)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    let fut = (inner.loader)(key.clone());
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        let result = fut.await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let mut entries = inner.lock();
        if let Some(e) = entries.get_mut(&key) {
            e.loading = false;
            match result {
                Ok(v) => {
                    e.value = Some((Arc::new(v), Instant::now()));
                    e.error = None;
                }
                Err(err) => e.error = Some(err),
            }
        }
    });
}

async fn refresh_loop<K, V, E>(weak: Weak<Inner<K, V, E>>)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
    E: Send + Sync + 'static,
{
    let period = match weak.upgrade() {
        Some(i) => (i.opts.ttl / 2).max(Duration::from_millis(10)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut entries = inner.lock();
            entries.retain(|_, e| now.duration_since(e.last_asked) < inner.opts.idle);
            for (k, e) in entries.iter_mut() {
                let stale = e
                    .value
                    .as_ref()
                    .is_none_or(|(_, at)| now.duration_since(*at) >= inner.opts.ttl);
                if stale && !e.loading {
                    e.loading = true;
                    due.push(k.clone());
                }
            }
        }
        for k in due {
            spawn_load(&inner, k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A loader's error in these tests: an HTTP status.
    #[derive(Debug, Clone, PartialEq)]
    struct Status(u16);

    fn opts() -> CacheOptions {
        CacheOptions {
            ttl: Duration::from_secs(10),
            max_stale: Duration::from_secs(30),
            idle: Duration::from_secs(60),
        }
    }

    async fn settle() {
        // Let spawned loads run (paused time: no real waiting).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn answers_at_once_then_serves_and_refreshes() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let cache = ReactiveCache::new(opts(), move |k: u32| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok::<_, Status>(k * 100 + n)
            })
        });
        assert_eq!(cache.get(&1), Cached::NotReady);
        tokio::time::sleep(Duration::from_secs(3)).await;
        settle().await;
        let Cached::Ready { value, .. } = cache.get(&1) else {
            panic!("not ready")
        };
        assert_eq!(*value, 100);
        // Past the TTL the old value is still served while a refresh runs.
        tokio::time::sleep(Duration::from_secs(11)).await;
        settle().await;
        assert!(matches!(cache.get(&1), Cached::Ready { .. }));
        tokio::time::sleep(Duration::from_secs(3)).await;
        settle().await;
        let Cached::Ready { value, .. } = cache.get(&1) else {
            panic!("not ready")
        };
        assert_eq!(*value, 101);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_stop_refreshing_and_stale_values_are_not_served() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = fail.clone();
        let cache = ReactiveCache::new(opts(), move |_k: u32| {
            c.fetch_add(1, Ordering::SeqCst);
            let fail = f.load(Ordering::SeqCst);
            Box::pin(async move {
                if fail {
                    Err(Status(503))
                } else {
                    Ok(1)
                }
            })
        });
        cache.get(&7);
        settle().await;
        // Failing refreshes: the value is served until it is max_stale old, then the error.
        fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(20)).await;
        settle().await;
        assert!(matches!(cache.get(&7), Cached::Ready { .. }));
        tokio::time::sleep(Duration::from_secs(15)).await;
        settle().await;
        assert_eq!(cache.get(&7), Cached::Failed(Status(503)));
        // Nobody asks for a while: no more refreshes, and the key is dropped.
        tokio::time::sleep(Duration::from_secs(61)).await;
        settle().await;
        let before = calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(120)).await;
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), before);
        assert!(cache.is_empty());
    }
}
