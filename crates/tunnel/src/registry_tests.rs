//! Tests of the tunnel registry in memory, with tokio's clock paused: agents are fake ends
//! made of channels, so waiting, handing over, reuse, busy counts and cancellation are
//! checked exactly, without sockets and without real time passing.

use crate::testing::{self, FakeAgentEnd};
use crate::{AcquireError, ReplicaGuard, ReplicaInfo, TunnelRegistry};
use bytes::Bytes;
use http_body_util::Empty;
use kas_proto::v1::{agent_frame, RequestHead, ResponseHead};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;

const AGENT: u64 = 7;

fn replica(id: &str) -> ReplicaInfo {
    ReplicaInfo {
        replica_id: id.into(),
        agent_version: "test".into(),
        peer: "memory".into(),
        meta: Default::default(),
    }
}

/// Offers one tunnel of `guard`'s replica; returns the agent's end of it.
fn offer(reg: &Arc<TunnelRegistry>, guard: &ReplicaGuard) -> FakeAgentEnd {
    let (inbound, out, agent) = testing::tunnel();
    reg.offer(AGENT, guard.connection_key(), inbound, out);
    agent
}

fn get(path: &str) -> RequestHead {
    RequestHead {
        method: "GET".into(),
        path_and_query: path.into(),
        end_of_body: true,
        ..Default::default()
    }
}

fn counts(reg: &TunnelRegistry) -> (usize, usize) {
    reg.snapshot()
        .iter()
        .find(|a| a.agent_id == AGENT)
        .map(|a| (a.idle_tunnels, a.busy_tunnels))
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_never_connects_is_not_connected_after_the_wait() {
    let reg = TunnelRegistry::new();
    let started = tokio::time::Instant::now();
    let err = reg
        .acquire(AGENT, Duration::from_secs(20))
        .await
        .expect_err("no tunnel");
    assert_eq!(err, AcquireError::NotConnected);
    assert_eq!(started.elapsed(), Duration::from_secs(20));
    // The waiter left nothing behind.
    assert!(reg.snapshot().is_empty());
    assert!(!reg.is_connected(AGENT));
}

#[tokio::test(start_paused = true)]
async fn a_connected_agent_without_free_tunnels_says_so() {
    let reg = TunnelRegistry::new();
    let _guard = reg.add_replica(AGENT, replica("a"));
    let err = reg
        .acquire(AGENT, Duration::from_secs(1))
        .await
        .expect_err("no tunnel");
    assert_eq!(err, AcquireError::NoFreeTunnel);
    assert!(reg.is_connected(AGENT));
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_come_first_served() {
    let reg = TunnelRegistry::new();
    let guard = reg.add_replica(AGENT, replica("a"));
    let (r1, r2) = (reg.clone(), reg.clone());
    let first = tokio::spawn(async move { r1.acquire(AGENT, Duration::from_secs(20)).await });
    tokio::task::yield_now().await;
    let second = tokio::spawn(async move { r2.acquire(AGENT, Duration::from_secs(20)).await });
    tokio::task::yield_now().await;
    let _t1 = offer(&reg, &guard);
    let got = first
        .await
        .expect("join")
        .expect("the first waiter gets the tunnel");
    assert_eq!(got.agent_id(), AGENT);
    assert!(!second.is_finished(), "one tunnel serves one waiter");
    let _t2 = offer(&reg, &guard);
    let _got2 = second
        .await
        .expect("join")
        .expect("the second waiter gets the next");
    assert_eq!(counts(&reg), (0, 2));
    drop(got);
    assert_eq!(counts(&reg), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn idle_tunnels_are_used_in_the_order_offered_across_replicas() {
    let reg = TunnelRegistry::new();
    let a = reg.add_replica(AGENT, replica("a"));
    let b = reg.add_replica(AGENT, replica("b"));
    let _ta = offer(&reg, &a);
    let _tb = offer(&reg, &b);
    assert_eq!(counts(&reg), (2, 0));
    let wait = Duration::from_secs(1);
    let t1 = reg.acquire(AGENT, wait).await.expect("tunnel");
    let t2 = reg.acquire(AGENT, wait).await.expect("tunnel");
    assert_eq!(t1.connection_key(), a.connection_key());
    assert_eq!(t2.connection_key(), b.connection_key());
    assert_eq!(counts(&reg), (0, 2));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_does_not_swallow_the_next_tunnel() {
    let reg = TunnelRegistry::new();
    let guard = reg.add_replica(AGENT, replica("a"));
    let r = reg.clone();
    let waiter = tokio::spawn(async move { r.acquire(AGENT, Duration::from_secs(20)).await });
    tokio::task::yield_now().await;
    // The client went away while waiting.
    waiter.abort();
    assert!(waiter.await.expect_err("aborted").is_cancelled());
    let _t = offer(&reg, &guard);
    assert_eq!(counts(&reg), (1, 0), "the tunnel is idle, not lost");
    reg.acquire(AGENT, Duration::ZERO)
        .await
        .expect("the next request gets it");
}

#[tokio::test(start_paused = true)]
async fn a_clean_exchange_hands_the_tunnel_back_for_the_next_request() {
    let reg = TunnelRegistry::new();
    let guard = reg.add_replica(AGENT, replica("a"));
    let mut agent = offer(&reg, &guard);
    for i in 0..3 {
        let tunnel = reg.acquire(AGENT, Duration::ZERO).await.expect("tunnel");
        assert_eq!(counts(&reg), (0, 1));
        let path = format!("/api/v1/pods?i={i}");
        let exchange = tunnel.round_trip(get(&path), Empty::<Bytes>::new());
        let serve = async {
            assert_eq!(agent.request().await.path_and_query, path);
            agent.respond(200, "ok");
        };
        let ((head, mut body), ()) =
            tokio::join!(async { exchange.await.expect("exchange") }, serve);
        assert_eq!(head.status, 200);
        assert_eq!(
            body.next_chunk().await.expect("body"),
            Some(Bytes::from("ok"))
        );
        assert_eq!(body.next_chunk().await.expect("end"), None);
        // The same tunnel is idle again: one tunnel carried every request.
        assert_eq!(counts(&reg), (1, 0));
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_exchange_does_not_return_its_tunnel() {
    let reg = TunnelRegistry::new();
    let guard = reg.add_replica(AGENT, replica("a"));
    let mut agent = offer(&reg, &guard);
    let tunnel = reg.acquire(AGENT, Duration::ZERO).await.expect("tunnel");
    let exchange = tunnel.round_trip(get("/api"), Empty::<Bytes>::new());
    let serve = async {
        agent.request().await;
        agent.send(agent_frame::Msg::ResponseHead(ResponseHead {
            status: 200,
            ..Default::default()
        }));
        agent.send(agent_frame::Msg::Error(kas_proto::v1::TunnelError {
            code: 0,
            message: "upstream reset".into(),
        }));
    };
    let ((_, mut body), ()) = tokio::join!(async { exchange.await.expect("head") }, serve);
    assert!(body.next_chunk().await.is_err());
    drop(body);
    assert_eq!(
        counts(&reg),
        (0, 0),
        "a broken tunnel is neither idle nor busy"
    );
}

#[tokio::test(start_paused = true)]
async fn tunnels_the_agent_closed_are_skipped() {
    let reg = TunnelRegistry::new();
    let guard = reg.add_replica(AGENT, replica("a"));
    let gone = offer(&reg, &guard);
    let _live = offer(&reg, &guard);
    // The agent dropped its first tunnel (its read side is gone).
    drop(gone);
    assert_eq!(counts(&reg), (1, 0));
    reg.acquire(AGENT, Duration::ZERO)
        .await
        .expect("the live tunnel");
    assert_eq!(
        reg.acquire(AGENT, Duration::ZERO).await.err(),
        Some(AcquireError::NoFreeTunnel)
    );
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_disconnects_takes_its_idle_tunnels_along() {
    let reg = TunnelRegistry::new();
    let a = reg.add_replica(AGENT, replica("a"));
    let b = reg.add_replica(AGENT, replica("b"));
    let _ta = offer(&reg, &a);
    let _tb = offer(&reg, &b);
    let b_key = b.connection_key().clone();
    drop(a);
    assert_eq!(counts(&reg), (1, 0));
    assert_eq!(reg.connection_keys(AGENT), vec![b_key.clone()]);
    assert!(reg.try_acquire_from(AGENT, &b_key).is_some());
    drop(b);
    assert!(!reg.is_connected(AGENT));
    assert!(reg.snapshot().is_empty());
    // A tunnel offered for a replica that is gone is refused (and closed).
    let late = reg.add_replica(AGENT, replica("c"));
    let key = late.connection_key().clone();
    drop(late);
    let (inbound, out, mut agent) = testing::tunnel();
    reg.offer(AGENT, &key, inbound, out);
    assert!(reg.snapshot().is_empty());
    assert!(
        agent.from_kas.next().await.is_none(),
        "the refused tunnel is closed"
    );
}

#[tokio::test(start_paused = true)]
async fn the_same_replica_reconnecting_gets_a_distinct_key() {
    let reg = TunnelRegistry::new();
    let old = reg.add_replica(AGENT, replica("a"));
    let new = reg.add_replica(AGENT, replica("a"));
    assert_ne!(old.connection_key(), new.connection_key());
    let _t = offer(&reg, &new);
    // The old connection's teardown does not take the new one's tunnels.
    drop(old);
    assert!(reg.is_connected(AGENT));
    assert!(reg.try_acquire_from(AGENT, new.connection_key()).is_some());
}
