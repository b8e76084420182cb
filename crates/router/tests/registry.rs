//! The Redis registry against a real redis-server started for the test.

use kas_router::{Connection, Event, RedisOptions, RedisRegistry};
use kas_test_support::services::Redis;
use std::time::{Duration, Instant};

fn conn(agent_id: u64) -> Connection {
    Connection {
        agent_id,
        connection: "replica-a#1".into(),
        kas_id: "kas-a".into(),
        kas_url: "http://127.0.0.1:1".into(),
        replica_id: "replica-a".into(),
        agent_version: "test".into(),
        since: 0,
        meta: Default::default(),
    }
}

async fn registry(url: &str, kas_id: &str) -> std::sync::Arc<RedisRegistry> {
    RedisRegistry::start(
        RedisOptions {
            url: url.to_string(),
            key_prefix: "kas".into(),
            // Lookups are cached for a third of this (5 s).
            expiry: Duration::from_secs(15),
        },
        kas_id,
    )
    .await
    .expect("registry")
}

/// After Redis lost its data, a kas that looked an agent up meanwhile caches "not
/// connected"; the holder's next refresh rebuilds the entry and must clear that answer
/// everywhere at once, not after the cache's lifetime.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuilt_registry_clears_cached_absence_at_once() {
    let redis = tokio::task::spawn_blocking(Redis::start)
        .await
        .expect("redis");
    let holder = registry(&redis.url(), "kas-a").await;
    let reader = registry(&redis.url(), "kas-b").await;
    // Registered, and the reader's event subscription is live.
    let mut events = reader.events();
    loop {
        holder.register(conn(7));
        match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
            Ok(Ok(Event::Connected(7))) => break,
            _ => continue,
        }
    }
    assert_eq!(reader.connections(7).await.expect("read").len(), 1);

    // Redis loses everything.
    let client = redis::Client::open(redis.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut c)
        .await
        .expect("flush");
    reader.forget(7);
    assert!(
        reader.connections(7).await.expect("read").is_empty(),
        "the reader now caches the absence"
    );

    // One refresh rebuilds the registry; the reader sees the agent again at once.
    holder.refresh().await.expect("refresh");
    let start = Instant::now();
    loop {
        if !reader.connections(7).await.expect("read").is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the reader still answers from its stale cache"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A refresh that finds its entries in place announces nothing.
    let mut events = reader.events();
    holder.refresh().await.expect("refresh");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.recv())
            .await
            .is_err(),
        "an unchanged refresh is silent"
    );
}
