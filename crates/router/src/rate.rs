//! Fixed-window rate limits (events per key and minute), counted in Redis when kas
//! shares a registry, so that every replica counts against one limit, and in memory
//! otherwise (or while Redis is unreachable, rather than refusing everything).

use crate::redis::RedisRegistry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Counts kept in memory before stale minutes are dropped.
const LOCAL_MAX: usize = 100_000;

/// A limit of `limit` events per key per minute; see the module docs.
pub struct RateLimiter {
    name: &'static str,
    limit: u32,
    /// key -> (minute, count), when counting locally.
    local: Mutex<HashMap<u64, (u64, u32)>>,
    redis: Option<Arc<RedisRegistry>>,
}

fn minute() -> u64 {
    kas_api::clock::unix_secs() / 60
}

impl RateLimiter {
    /// A limiter named `name` (part of the Redis key), shared through `redis` if given.
    pub fn new(name: &'static str, limit: u32, redis: Option<Arc<RedisRegistry>>) -> Self {
        RateLimiter {
            name,
            limit,
            local: Mutex::default(),
            redis,
        }
    }

    /// Counts one event for `key`; false when the key is over its limit this minute.
    pub async fn allow(&self, key: u64) -> bool {
        let now = minute();
        if let Some(r) = &self.redis {
            match r
                .count_in_window(&format!("rate:{}:{key}:{now}", self.name), 120)
                .await
            {
                Ok(n) => return n <= u64::from(self.limit),
                Err(e) => {
                    r.count_error();
                    tracing::debug!(error = %e, "rate limit: Redis unreachable; counting on this kas only");
                }
            }
        }
        self.allow_local(key, now)
    }

    fn allow_local(&self, key: u64, now: u64) -> bool {
        let mut map = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= LOCAL_MAX {
            map.retain(|_, (m, _)| *m == now);
        }
        let e = map.entry(key).or_insert((now, 0));
        if e.0 != now {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
        e.1 <= self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_key_and_minute() {
        let r = RateLimiter::new("t", 3, None);
        assert!((0..3).all(|_| r.allow_local(1, 10)));
        assert!(!r.allow_local(1, 10));
        assert!(r.allow_local(2, 10), "other keys have their own count");
        assert!(r.allow_local(1, 11), "a new minute starts over");
    }
}
