//! Routing between kas replicas (Redis + private API), measured in the same run:
//! (d) a request entering the kas that holds the agent (local) versus entering another
//! replica (cross); (e) time from an agent dialing kas to the first response routed to
//! it, for a request already waiting; (f) the Redis registry's memory per agent and the
//! cost of a refresh, with 10,000 agents over 2 kas replicas.

use crate::{latency, pct, report_latency, throughput};
use anyhow::{bail, Context, Result};
use kas_router::{Connection, RedisOptions, RedisRegistry};
use kas_test_support::fixture::wait_for;
use kas_test_support::http as tclient;
use kas_test_support::replicas::{Replicas, EXPIRY};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONFIG: &str = "ci_access:\n  groups:\n    - id: bench\n";

fn used_memory(port: u16) -> Result<u64> {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "memory"])
        .output()
        .context("redis-cli")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .context("used_memory in INFO")
}

pub async fn run(requests: usize, seconds: u64, registry_agents: usize) -> Result<()> {
    let mut r = Replicas::start(2).await;
    r.kasctl(0, &["project", "create", "bench/app"]);
    let (agent, token) = r.create_agent("bench/agents", "routed", CONFIG);
    // The agent is on kas 1 only: entering kas 1 is local, entering kas 0 is cross.
    r.start_agentk(&token, &[1]);
    let check = |via| r.wait_connections(via, agent, 1);
    check(0);
    check(1);
    let job = r.start_job("bench/app", "bench");
    let ci = format!("ci:{agent}:{}", job.token);
    let ca = std::fs::read(r.path("kas-data").join("k8s-proxy-ca.crt"))?;
    let (lc, cc) = (tclient::client(&ca, false), tclient::client(&ca, false));
    let url = |via: usize| {
        format!(
            "{}/api/v1/namespaces/default/pods",
            r.info[via].k8s_proxy.trim_end_matches('/')
        )
    };
    let (local_url, cross_url) = (url(1), url(0));
    let (l, c) = latency((&lc, &local_url, &ci), (&cc, &cross_url, &ci), requests).await?;
    println!("(d) cross-replica routing (request into kas A, agent on kas B) versus local, {requests} requests each, interleaved");
    report_latency(("local", &l), ("cross", &c), "   (target p50 <= 150 us)");
    let (tl, _) = throughput(&lc, &local_url, &ci, 32, seconds).await?;
    let (tc, _) = throughput(&cc, &cross_url, &ci, 32, seconds).await?;
    println!(
        "    concurrency 32: local {tl:8.0} req/s   cross {tc:8.0} req/s   ratio {:.2}x",
        tc / tl
    );

    // (e) a request waits; an agent dials; how long until the response arrives.
    let access = agentk::ClusterAccess::from_kubeconfig(&r.cluster_kubeconfig, None).await?;
    let upstream = Arc::new(agentk::Upstream::new(access)?);
    println!("(e) agent dial -> first routed response of a waiting request, 20 runs each");
    for (label, via, target_ms) in [("local", 1usize, 10), ("cross", 0usize, 20)] {
        let mut times = Vec::new();
        for i in 0..20 {
            let name = format!("e-{label}-{i}");
            let (id, token_file) = r.create_agent("bench/agents", &name, CONFIG);
            let bearer = format!("ci:{id}:{}", job.token);
            let before = waiting_lines(&r, via);
            let client = if via == 1 { lc.clone() } else { cc.clone() };
            let u = url(via);
            let pending =
                tokio::spawn(async move { tclient::get(&client, &u, Some(&bearer)).await });
            // Start the agent only once kas holds the request.
            let rr = &r;
            tokio::task::block_in_place(|| {
                wait_for(Duration::from_secs(10), "request to wait", || {
                    (waiting_lines(rr, via) > before).then_some(())
                })
            });
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let opts = agentk::ConnectOptions {
                kas_addresses: vec![r.info[1].agent.clone()],
                token: std::fs::read_to_string(&token_file)?.trim().to_string(),
                ca_cert_pem: None,
                min_idle_tunnels: 2,
                max_tunnels: 16,
                replica_id: name.clone(),
                kas_headers: Vec::new(),
                tls_server_name: None,
                insecure_skip_tls_verify: false,
                proxy: Default::default(),
            };
            let (ctx, _crx) = tokio::sync::watch::channel(None);
            let t0 = Instant::now();
            tokio::spawn(agentk::run(opts, upstream.clone(), ctx, stop_rx));
            let (code, body) = pending.await?;
            times.push(t0.elapsed());
            if code != 200 {
                bail!("waiting request answered {code}: {body}");
            }
            let _ = stop_tx.send(true);
        }
        times.sort();
        println!(
            "    {label:5}   p50 {:6.2} ms   p99 {:6.2} ms   (target p99 <= {target_ms} ms; includes dialing kas)",
            pct(&times, 0.5).as_secs_f64() * 1e3,
            pct(&times, 0.99).as_secs_f64() * 1e3,
        );
    }

    registry(&r, registry_agents).await
}

/// (f) the registry itself: N agents over two kas instances.
async fn registry(r: &Replicas, registry_agents: usize) -> Result<()> {
    let opts = RedisOptions {
        url: r.redis.url(),
        key_prefix: "bench".into(),
        expiry: EXPIRY * 100,
    };
    let base = used_memory(r.redis.port)?;
    let regs = [
        RedisRegistry::start(opts.clone(), "bench-kas-a").await?,
        RedisRegistry::start(opts, "bench-kas-b").await?,
    ];
    for i in 0..registry_agents {
        let reg = &regs[i % 2];
        reg.register(Connection {
            agent_id: 1_000_000 + i as u64,
            connection: format!("{:016x}#{i}", rand::random::<u64>()),
            kas_id: if i % 2 == 0 {
                "bench-kas-a"
            } else {
                "bench-kas-b"
            }
            .into(),
            kas_url: "http://10.0.0.1:8155".into(),
            replica_id: format!("{:016x}", rand::random::<u64>()),
            agent_version: "0.1.0".into(),
            since: 0,
            meta: Default::default(),
        });
    }
    let mut refresh = Vec::new();
    for _ in 0..5 {
        for reg in &regs {
            let t = Instant::now();
            reg.refresh().await?;
            refresh.push(t.elapsed());
        }
    }
    refresh.sort();
    let used = used_memory(r.redis.port)?.saturating_sub(base);
    let per_kas = registry_agents / 2;
    println!("(f) registry with {registry_agents} agents over 2 kas replicas");
    println!(
        "    Redis memory {:.1} MiB: {:.0} bytes per agent connection",
        used as f64 / (1 << 20) as f64,
        used as f64 / registry_agents as f64
    );
    println!(
        "    one refresh of {per_kas} connections (one kas): p50 {:.1} ms ({:.1} us per connection), every expiry/3",
        pct(&refresh, 0.5).as_secs_f64() * 1e3,
        pct(&refresh, 0.5).as_secs_f64() * 1e6 / per_kas as f64
    );
    for reg in &regs {
        reg.shutdown().await;
    }
    Ok(())
}

fn waiting_lines(r: &Replicas, via: usize) -> usize {
    r.kas[via]
        .as_ref()
        .map(|k| k.logs().matches("waiting for the agent to connect").count())
        .unwrap_or(0)
}
