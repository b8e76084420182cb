//! Several kas replicas on one Redis and one PostgreSQL (real servers started for the
//! tests): routing between replicas, re-homing, waiting for agents, Redis outages and
//! the private API's authentication.

use kas_test_support::fixture::{wait_for, Job};
use kas_test_support::replicas::{Replicas, EXPIRY};
use kas_test_support::story;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const PROJECT: &str = "acme/web/shop";

fn config(user: &str) -> String {
    format!("ci_access:\n  projects:\n    - id: {PROJECT}\n      access_as:\n        impersonate:\n          username: {user}\n")
}

fn assert_ok(out: &std::process::Output, what: &str, r: &Replicas) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r.logs()
    );
}

/// Agent alpha connected to kas `on` only (and seen from kas `seen_via`), and a job of
/// the project allowed to use it; returns the agent id, the job and the kubectl context.
fn alpha_on(r: &mut Replicas, on: usize, seen_via: usize) -> (u64, Job, &'static str) {
    let _ = r.kasctl(0, &["project", "create", PROJECT]);
    let (a, token) = r.create_agent("acme/platform/agents", "alpha", &config("agent-alpha"));
    r.start_agentk(&token, &[on]);
    r.wait_connections(seen_via, a, 1);
    (
        a,
        r.start_job(PROJECT, "alice"),
        "acme/platform/agents:alpha",
    )
}

/// A request body, a watch stream and an exec upgrade all cross between replicas: the
/// agent is connected only to kas 1 and kubectl enters through kas 0.
#[tokio::test(flavor = "multi_thread")]
async fn apply_watch_and_exec_cross_replicas() {
    let mut r = Replicas::start(2).await;
    let (_, job, ctx) = alpha_on(&mut r, 1, 0);
    let seen = story::exercise(
        &story::Target {
            api: &r.api,
            kubectl: &|args| r.kubectl_cmd(0, &job, ctx, args),
            dir: r.dir.path(),
            logs: &|| r.logs(),
        },
        "default",
        "cross",
    );
    assert_eq!(seen.len(), 4);
    for rec in seen {
        assert_eq!(
            rec.impersonate_user.as_deref(),
            Some("agent-alpha"),
            "{}",
            rec.path
        );
    }
}

/// The identity the cluster saw for the request listing pods in `ns`.
fn seen_as(r: &Replicas, ns: &str) -> Option<String> {
    r.api
        .recorded_for(&format!("/api/v1/namespaces/{ns}/pods"))
        .last()
        .and_then(|rec| rec.impersonate_user.clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_entering_any_replica_reach_the_right_agent() {
    let mut r = Replicas::start(3).await;
    let _ = r.kasctl(0, &["project", "create", PROJECT]);
    let (a, token_a) = r.create_agent("acme/platform/agents", "alpha", &config("agent-alpha"));
    let (b, token_b) = r.create_agent("acme/platform/agents", "beta", &config("agent-beta"));
    // alpha on kas 0 and 1, beta on kas 1 and 2: every entry point has to route
    // across replicas for one of them.
    r.start_agentk(&token_a, &[0]);
    r.start_agentk(&token_a, &[1]);
    r.start_agentk(&token_b, &[1]);
    r.start_agentk(&token_b, &[2]);
    for via in 0..3 {
        r.wait_connections(via, a, 2);
        r.wait_connections(via, b, 2);
    }
    let job = r.start_job(PROJECT, "alice");
    for via in 0..3 {
        for (name, user) in [("alpha", "agent-alpha"), ("beta", "agent-beta")] {
            let ns = format!("via{via}-{name}");
            let ctx = format!("acme/platform/agents:{name}");
            let out = r.kubectl(via, &job, &ctx, &["get", "pods", "-n", &ns]);
            assert_ok(&out, &format!("kubectl via kas {via} to {name}"), &r);
            assert_eq!(seen_as(&r, &ns).as_deref(), Some(user), "via kas {via}");
        }
    }
    let listing = r.kasctl(2, &["agents"]);
    assert!(
        listing.contains("alpha") && listing.contains("beta"),
        "{listing}"
    );
    // A configuration change made through one replica reaches the agent replicas
    // connected to the others within 5 s (PostgreSQL NOTIFY -> each kas -> its agents).
    let cfg = r.path("beta-v2.yaml");
    std::fs::write(&cfg, config("agent-beta")).expect("config");
    let v = r.kasctl_json(
        0,
        &[
            "agent",
            "config",
            "set",
            "acme/platform/agents",
            "beta",
            cfg.to_str().expect("path"),
        ],
    );
    let version = v["version"].as_u64().expect("version");
    for via in [1, 2] {
        let own = r.info[via].instance.clone();
        wait_for(Duration::from_secs(5), "config to reach the agent", || {
            let agents = r.kasctl_json(via, &["agents"]);
            agents
                .as_array()?
                .iter()
                .find(|x| x["id"].as_u64() == Some(b))?["replicas"]
                .as_array()?
                .iter()
                .any(|rep| {
                    rep["kas"] == own.as_str() && rep["config_version"].as_u64() == Some(version)
                })
                .then_some(())
        });
    }
    // Finishing the job through one replica revokes it on all of them.
    r.kasctl(1, &["job", "finish", &job.id.to_string()]);
    for via in 0..3 {
        let out = r.kubectl(via, &job, "acme/platform/agents:alpha", &["get", "pods"]);
        assert!(
            !out.status.success(),
            "finished job still works via kas {via}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_rehome_when_a_kas_is_killed_and_its_entries_expire() {
    let mut r = Replicas::start(2).await;
    let _ = r.kasctl(0, &["project", "create", PROJECT]);
    let (a, token) = r.create_agent("acme/platform/agents", "alpha", &config("agent-alpha"));
    r.start_agentk(&token, &[0, 1]);
    r.start_agentk(&token, &[0, 1]);
    let conns = r.wait_connections(0, a, 2);
    let victim = r.index_of(&conns[0]);
    let survivor = 1 - victim;
    let dead_id = r.info[victim].instance.clone();
    let job = r.start_job(PROJECT, "alice");
    let ctx = "acme/platform/agents:alpha";
    let out = r.kubectl(survivor, &job, ctx, &["get", "pods", "-n", "before"]);
    assert_ok(&out, "kubectl before the kill", &r);

    // Traffic through the survivor during the kill.
    let ca = std::fs::read(r.path("kas-data").join("k8s-proxy-ca.crt")).expect("CA");
    let client = kas_test_support::http::client(&ca, false);
    let url = format!(
        "{}/api/v1/namespaces/traffic/pods",
        r.info[survivor].k8s_proxy.trim_end_matches('/')
    );
    let bearer = format!("ci:{a}:{}", job.token);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let (code, body) = kas_test_support::http::get(&client, &url, Some(&bearer)).await;
                results.push((started, code, body));
            }
            results
        })
    };

    let killed_at = Instant::now();
    r.kill_kas(victim);
    // Every agent replica re-homes to the survivor within 5 s.
    wait_for(Duration::from_secs(5), "agents to re-home", || {
        let c = r.connections(survivor, a);
        let on_survivor = c
            .iter()
            .filter(|k| **k == r.info[survivor].instance)
            .count();
        (on_survivor == 2).then_some(())
    });
    let rehomed = killed_at.elapsed();
    let rehomed_at = Instant::now();
    wait_for(Duration::from_secs(10), "traffic after re-homing", || {
        (r.api.recorded_for("/api/v1/namespaces/traffic/pods").len() > 20).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = traffic.await.expect("traffic");
    for (started, code, body) in &results {
        // In flight on the dead kas: a clean error Status; everything else: success.
        if *started > rehomed_at {
            assert_eq!(*code, 200, "request after re-homing failed: {body}");
        } else if *code != 200 {
            assert!(matches!(code, 502 | 503), "unclean failure {code}: {body}");
            assert!(body.contains("\"kind\":\"Status\""), "{body}");
        }
    }
    let failed = results.iter().filter(|r| r.1 != 200).count();
    eprintln!(
        "{} requests during the kill, {failed} failed cleanly",
        results.len()
    );
    let out = r.kubectl(survivor, &job, ctx, &["get", "pods", "-n", "after"]);
    assert_ok(&out, "kubectl after the kill", &r);
    assert_eq!(seen_as(&r, "after").as_deref(), Some("agent-alpha"));
    // The dead replica's entries are gone within the expiry (plus one sweep).
    wait_for(EXPIRY * 2, "dead kas entries to expire", || {
        (!r.connections(survivor, a).contains(&dead_id)).then_some(())
    });
    eprintln!("re-homed in {rehomed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_waits_for_its_agent_to_connect_anywhere() {
    let mut r = Replicas::start(2).await;
    let _ = r.kasctl(0, &["project", "create", PROJECT]);
    let (_, token) = r.create_agent("acme/platform/agents", "alpha", &config("agent-alpha"));
    let job = r.start_job(PROJECT, "alice");
    let ctx = "acme/platform/agents:alpha";
    // Sent through kas 0 before the agent exists anywhere...
    let child = r
        .kubectl_cmd(0, &job, ctx, &["get", "pods", "-n", "waiting"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl");
    // ...once kas 0 is holding it, the agent connects to kas 1.
    wait_for(Duration::from_secs(10), "kas 0 to hold the request", || {
        r.kas[0]
            .as_ref()
            .is_some_and(|k| k.logs().contains("waiting for the agent to connect"))
            .then_some(())
    });
    let connected_at = Instant::now();
    r.start_agentk(&token, &[1]);
    let out = child.wait_with_output().expect("kubectl");
    assert_ok(&out, "kubectl waiting for the agent", &r);
    assert_eq!(seen_as(&r, "waiting").as_deref(), Some("agent-alpha"));
    eprintln!(
        "answered {:?} after the agent started",
        connected_at.elapsed()
    );

    // An agent that never connects: 503 with a Status saying so, after the timeout.
    let (never, _) = r.create_agent("acme/platform/agents", "never", &config("x"));
    let job2 = r.start_job(PROJECT, "bob");
    let ca = std::fs::read(r.path("kas-data").join("k8s-proxy-ca.crt")).expect("CA");
    let client = kas_test_support::http::client(&ca, false);
    let url = format!(
        "{}/api/v1/namespaces",
        r.info[0].k8s_proxy.trim_end_matches('/')
    );
    let bearer = format!("ci:{never}:{}", job2.token);
    let (code, body) = kas_test_support::http::get(&client, &url, Some(&bearer)).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"kind\":\"Status\""), "{body}");
    assert!(body.contains("not connected"), "{body}");
}

fn raw_status(addr: &str, headers: &str) -> String {
    let hostport = addr.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(hostport).expect("connect private API");
    write!(
        s,
        "POST /kas.agent.v1.Gateway/ForwardMany HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/grpc\r\nContent-Length: 0\r\nConnection: close\r\n{headers}\r\n"
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_private_api_refuses_missing_and_forged_tokens() {
    let r = Replicas::start(1).await;
    let private = &r.info[0].private;
    assert!(raw_status(private, "").contains(" 401 "));
    let forged = kas_router::PrivateAuth::new(&[1u8; 32], "intruder")
        .expect("auth")
        .token();
    let status = raw_status(private, &format!("Authorization: Bearer {forged}\r\n"));
    assert!(status.contains(" 401 "), "{status}");
    assert!(raw_status(private, "Authorization: Bearer not-a-jwt\r\n").contains(" 401 "));
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_keeps_local_routes_and_the_registry_recovers() {
    let mut r = Replicas::start(2).await;
    let (a, job, ctx) = alpha_on(&mut r, 0, 1);

    // Redis down for a while: the kas holding the agent keeps serving it.
    tokio::task::block_in_place(|| r.redis.stop());
    let out = r.kubectl(0, &job, ctx, &["get", "pods", "-n", "redis-down"]);
    assert_ok(&out, "kubectl with Redis down", &r);
    assert_eq!(seen_as(&r, "redis-down").as_deref(), Some("agent-alpha"));

    // Redis back, empty: the registry is complete again within one refresh.
    tokio::task::block_in_place(|| r.redis.restart());
    let back = Instant::now();
    wait_for(EXPIRY, "registry to be rebuilt", || {
        (r.connections(1, a).len() == 1).then_some(())
    });
    eprintln!("registry rebuilt {:?} after Redis returned", back.elapsed());
    let out = r.kubectl(1, &job, ctx, &["get", "pods", "-n", "redis-back"]);
    assert_ok(&out, "kubectl across replicas after Redis returned", &r);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_and_leaves_the_registry() {
    use http_body_util::BodyExt;
    let mut r = Replicas::start(2).await;
    let _ = r.kasctl(0, &["project", "create", PROJECT]);
    let (a, token) = r.create_agent("acme/platform/agents", "alpha", &config("agent-alpha"));
    r.start_agentk(&token, &[0, 1]);
    let conns = r.wait_connections(0, a, 1);
    let victim = r.index_of(&conns[0]);
    let other = 1 - victim;
    let victim_id = r.info[victim].instance.clone();
    let job = r.start_job(PROJECT, "alice");

    // A large response in flight through the kas about to stop.
    let ca = std::fs::read(r.path("kas-data").join("k8s-proxy-ca.crt")).expect("CA");
    let client = kas_test_support::http::client(&ca, false);
    let size: usize = 32 << 20;
    let url = format!(
        "{}/_test/bytes?n={size}",
        r.info[victim].k8s_proxy.trim_end_matches('/')
    );
    let bearer = format!("ci:{a}:{}", job.token);
    let resp = kas_test_support::http::send(&client, &url, Some(&bearer)).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0usize;
    while got == 0 {
        let frame = body.frame().await.expect("a frame").expect("data");
        got += frame.data_ref().map(|d| d.len()).unwrap_or(0);
    }

    let pid = r.kas[victim].as_ref().expect("running").pid();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    // The stopping kas leaves the registry at once, well before its entries would expire...
    let gone = Instant::now();
    wait_for(EXPIRY, "the stopping kas to leave the registry", || {
        (!r.connections(other, a).contains(&victim_id)).then_some(())
    });
    assert!(gone.elapsed() < EXPIRY, "entries only expired");
    // ...while the request in flight finishes whole.
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap_or_else(|e| {
            let exited = r.kas[victim].as_mut().map(|k| k.child.try_wait());
            panic!(
                "the in-flight body broke after {got} bytes: {e}; kas exited: {exited:?}\n{}",
                r.logs()
            )
        });
        got += frame.data_ref().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(got, size);
    // The agent moved to the other kas, which serves new requests.
    wait_for(Duration::from_secs(10), "agent to re-home", || {
        (r.connections(other, a) == [r.info[other].instance.clone()]).then_some(())
    });
    let out = r.kubectl(
        other,
        &job,
        "acme/platform/agents:alpha",
        &["get", "pods", "-n", "after-term"],
    );
    assert_ok(&out, "kubectl after SIGTERM", &r);
    let exited = tokio::task::block_in_place(|| r.kas[victim].as_mut().expect("proc").child.wait());
    assert!(
        exited.as_ref().is_ok_and(|s| s.success()),
        "kas did not exit cleanly: {exited:?}"
    );
}

/// Many exchanges through another kas, concurrently: HTTP/2 peers close a connection
/// that resets too many streams (1,024), so forwarded exchanges must end cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_forwarded_exchanges_all_succeed() {
    let mut r = Replicas::start(2).await;
    let _ = r.kasctl(0, &["project", "create", PROJECT]);
    let (a, token) = r.create_agent("acme/platform/agents", "alpha", &config("agent-alpha"));
    r.start_agentk(&token, &[1]);
    r.wait_connections(0, a, 1);
    let job = r.start_job(PROJECT, "alice");
    let ca = std::fs::read(r.path("kas-data").join("k8s-proxy-ca.crt")).expect("CA");
    let url = format!(
        "{}/api/v1/namespaces/many/pods",
        r.info[0].k8s_proxy.trim_end_matches('/')
    );
    let bearer = format!("ci:{a}:{}", job.token);
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let client = kas_test_support::http::client(&ca, false);
            let (url, bearer) = (url.clone(), bearer.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for _ in 0..100 {
                    let (code, body) =
                        kas_test_support::http::get(&client, &url, Some(&bearer)).await;
                    if code != 200 {
                        failures.push(format!("{code}: {body}"));
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.expect("worker"));
    }
    assert!(
        failures.is_empty(),
        "{} failed, first: {}",
        failures.len(),
        failures[0]
    );
    assert_eq!(
        r.api.recorded_for("/api/v1/namespaces/many/pods").len(),
        1600
    );
    // They went over streams kept open between the two kas, not one stream each.
    let metrics = kas_test_support::http::scrape(&r.info[0].observability).await;
    let sample = |name| kas_test_support::http::sample(&metrics, name);
    assert_eq!(sample("kas_forwarded_exchanges_total"), 1600.0, "{metrics}");
    let opened = sample("kas_forward_streams_opened_total");
    assert!((1.0..=32.0).contains(&opened), "{opened} streams opened");
    assert!(sample("kas_forward_streams_idle") >= 1.0, "{metrics}");
}

/// `/readyz` says not ready while the configured Redis is unusable, and ready again
/// once it is back.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_redis() {
    let mut r = Replicas::start(1).await;
    let url = format!("{}/readyz", r.info[0].observability);
    let client = kas_test_support::http::client(&[], false);
    let rt = tokio::runtime::Handle::current();
    let status = |c: &kas_test_support::http::HttpsClient| {
        tokio::task::block_in_place(|| rt.block_on(kas_test_support::http::get(c, &url, None))).0
    };
    assert_eq!(status(&client), 200);
    tokio::task::block_in_place(|| r.redis.stop());
    wait_for(Duration::from_secs(10), "not ready without Redis", || {
        (status(&client) == 503).then_some(())
    });
    tokio::task::block_in_place(|| r.redis.restart());
    wait_for(Duration::from_secs(10), "ready again", || {
        (status(&client) == 200).then_some(())
    });
}

/// A frozen kas replica (SIGSTOP: a long pause, a stuck node) answers nothing but still
/// holds its TCP connections. Its agents move to a live replica, and a request that
/// the live replica forwards to it fails over, within 30 s.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_replica_loses_its_agents_and_its_forwards_fail_over() {
    let mut r = Replicas::start_custom(2, "30s", "").await;
    let _ = r.kasctl(0, &["project", "create", PROJECT]);
    let (a, token) = r.create_agent("acme/platform/agents", "alpha", &config("agent-alpha"));
    r.start_agentk(&token, &[0, 1]);
    let on = r.index_of(&r.wait_connections(0, a, 1)[0]);
    let live = 1 - on;
    let job = r.start_job(PROJECT, "alice");
    let ctx = "acme/platform/agents:alpha";
    // Forwarded from the live replica to the one holding the agent (streams pooled).
    for _ in 0..2 {
        assert_ok(&r.kubectl(live, &job, ctx, &["get", "pods"]), "warm-up", &r);
    }
    let frozen_kas = |sig: &str| r.kas[on].as_ref().expect("running").signal(sig);
    frozen_kas("STOP");
    let frozen = Instant::now();
    let out = r.kubectl(live, &job, ctx, &["get", "pods", "-n", "during-freeze"]);
    let answered = frozen.elapsed();
    let moved = wait_for(
        Duration::from_secs(30),
        "the agent to move to the live replica",
        || {
            let c = r.connections(live, a);
            c.contains(&r.info[live].instance)
                .then_some(frozen.elapsed())
        },
    );
    frozen_kas("CONT");
    assert_ok(&out, "a request during the freeze", &r);
    eprintln!("answered after {answered:?}; agent moved after {moved:?}");
    assert!(answered < Duration::from_secs(30), "{answered:?}");
    assert!(moved < Duration::from_secs(30), "{moved:?}");
    assert_eq!(seen_as(&r, "during-freeze").as_deref(), Some("agent-alpha"));
}
