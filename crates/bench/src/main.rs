//! Benchmark harness: the same backend reached directly and through kas + agentk, in
//! one run, reported as ratios. Run with `cargo run --release -p kas-bench --bin bench`
//! (after `cargo build --release --workspace --bins`).
//!
//! (a) small GET: added latency p50/p99 at concurrency 1, throughput ratio at 32;
//! (b) a streamed response (1 GiB by default): throughput ratio;
//! (c) kas resident memory per idle connected agent (1,000 agents by default);
//! (ref) the same measurements through one nginx hop, when nginx is installed;
//! (d)-(f) routing between kas replicas (see `routing.rs`; needs redis-server and
//! PostgreSQL installed, as the tests do).

mod nginx;
mod routing;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kas_api::admin;
use kas_test_support::fixture::{wait_for, Env};
use kas_test_support::http as tclient;
use kas_test_support::procs::proc_status_kib;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
struct Args {
    /// Sequential requests for the latency measurement.
    #[arg(long, default_value_t = 3000)]
    requests: usize,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// Size of the streamed response in MiB.
    #[arg(long, default_value_t = 1024)]
    stream_mib: u64,
    /// Serve the proxy over plain HTTP (as behind a TLS-terminating ingress), to see the
    /// tunnel's cost without TLS.
    #[arg(long)]
    plaintext: bool,
    /// Only measure (a) throughput at concurrency 32 for this long (for profiling).
    #[arg(long)]
    profile_only: bool,
    /// Idle tunnels per agent in the memory measurement (agentk's default is 2).
    #[arg(long, default_value_t = 2)]
    idle_tunnels: usize,
    /// Idle agents for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Skip (d)-(f), the measurements with several kas replicas.
    #[arg(long)]
    skip_routing: bool,
    /// Only run (d)-(f).
    #[arg(long)]
    routing_only: bool,
    /// An extra argument for kas (repeat it), e.g. `--kas-arg=--log-level=warn`, to see
    /// what a setting costs.
    #[arg(long, allow_hyphen_values = true)]
    kas_arg: Vec<String>,
    /// Skip the nginx reference measurement.
    #[arg(long)]
    skip_nginx: bool,
    /// Serve kas's agent listener over TLS (as without a TLS-terminating ingress in
    /// front of kas): agents connect with grpcs://.
    #[arg(long)]
    agent_tls: bool,
    /// Only run (c), the memory per idle agent, on a fresh kas.
    #[arg(long)]
    memory_only: bool,
    /// Agents in the registry measurement (f).
    #[arg(long, default_value_t = 10_000)]
    registry_agents: usize,
}

const SMALL: &str = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[{"metadata":{"name":"web-0","namespace":"default"}}]}"#;

/// The backend: a tiny API-server-like endpoint and a byte stream, checking the token.
async fn backend(token: String) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let expected = Arc::new(format!("Bearer {token}"));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let expected = expected.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let ok = req
                            .headers()
                            .get("authorization")
                            .is_some_and(|v| v.as_bytes() == expected.as_bytes());
                        async move {
                            type B = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;
                            if !ok {
                                let mut r = hyper::Response::new(
                                    Full::new(Bytes::from_static(b"{}")).boxed_unsync(),
                                );
                                *r.status_mut() = hyper::StatusCode::UNAUTHORIZED;
                                return Ok::<hyper::Response<B>, Infallible>(r);
                            }
                            if req.uri().path() == "/bytes" {
                                let n: u64 = req
                                    .uri()
                                    .query()
                                    .and_then(|q| q.strip_prefix("n="))
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(0);
                                let chunk = Bytes::from(vec![b'k'; 256 * 1024]);
                                let s = futures::stream::unfold(n, move |left| {
                                    let chunk = chunk.clone();
                                    async move {
                                        if left == 0 {
                                            return None;
                                        }
                                        let take = left.min(chunk.len() as u64) as usize;
                                        Some((
                                            Ok::<_, Infallible>(Frame::data(chunk.slice(..take))),
                                            left - take as u64,
                                        ))
                                    }
                                });
                                return Ok(hyper::Response::new(StreamBody::new(s).boxed_unsync()));
                            }
                            let mut r = hyper::Response::new(
                                Full::new(Bytes::from_static(SMALL.as_bytes())).boxed_unsync(),
                            );
                            r.headers_mut().insert(
                                "content-type",
                                hyper::header::HeaderValue::from_static("application/json"),
                            );
                            Ok(r)
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Prints p50/p99 of a base path and another path (sorted samples), and what the other
/// one adds; `target` ends the last line.
fn report_latency(base: (&str, &[Duration]), other: (&str, &[Duration]), target: &str) {
    for (label, v) in [base, other] {
        println!(
            "    {label:<7} p50 {:8.1} us   p99 {:8.1} us",
            us(pct(v, 0.5)),
            us(pct(v, 0.99))
        );
    }
    println!(
        "    added   p50 {:8.1} us   p99 {:8.1} us{target}",
        us(pct(other.1, 0.5)) - us(pct(base.1, 0.5)),
        us(pct(other.1, 0.99)) - us(pct(base.1, 0.99))
    );
}

/// Requests to each target before the latency measurement starts.
pub(crate) const LATENCY_WARMUP: usize = 200;

/// Prints CPU per request of each process and, for several, of all together.
pub(crate) fn report_cpu(procs: &[(&str, Cpu)]) {
    for (name, cpu) in procs {
        println!("    CPU per request: {name:<7} {cpu}");
    }
    if procs.len() > 1 {
        let all = procs.iter().map(|(_, c)| *c).sum::<Cpu>();
        println!("    CPU per request: together {all}");
    }
}

/// Latency of `n` requests to each target, interleaved (one direct, one proxied, ...)
/// so that machine noise hits both sides alike. Returns sorted (direct, proxied).
async fn latency(
    direct: (&tclient::HttpsClient, &str, &str),
    proxied: (&tclient::HttpsClient, &str, &str),
    n: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    for (c, url, token) in [direct, proxied] {
        for _ in 0..LATENCY_WARMUP {
            let (code, _) = tclient::get(c, url, Some(token)).await;
            if code != 200 {
                bail!("{url} answered {code}");
            }
        }
    }
    let (mut d, mut p) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        for ((c, url, token), out) in [(direct, &mut d), (proxied, &mut p)] {
            let t = Instant::now();
            let resp = tclient::send(c, url, Some(token)).await;
            resp.into_body().collect().await?;
            out.push(t.elapsed());
        }
    }
    d.sort();
    p.sort();
    Ok((d, p))
}

/// Requests per second and requests served, `conc` clients for `secs` seconds.
async fn throughput(
    c: &tclient::HttpsClient,
    url: &str,
    token: &str,
    conc: usize,
    secs: u64,
) -> Result<(f64, f64)> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let (c, url, token) = (c.clone(), url.to_string(), token.to_string());
            let (done, failed, first) = (done.clone(), failed.clone(), first_failure.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let resp = tclient::send(&c, &url, Some(&token)).await;
                    let status = resp.status();
                    let body = resp.into_body().collect().await;
                    match body {
                        Ok(_) if status == 200 => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let what = match other {
                                Ok(b) => {
                                    format!("{status}: {}", String::from_utf8_lossy(&b.to_bytes()))
                                }
                                Err(e) => format!("{status}, body failed: {e}"),
                            };
                            first
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(what);
                        }
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    for t in tasks {
        t.await?;
    }
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = first_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        bail!(
            "{failed} requests to {url} failed during the throughput run; the first: {}",
            first.unwrap_or_default()
        );
    }
    let done = done.load(Ordering::Relaxed) as f64;
    Ok((done / start.elapsed().as_secs_f64(), done))
}

async fn stream(c: &tclient::HttpsClient, url: &str, token: &str) -> Result<f64> {
    let t = Instant::now();
    let resp = tclient::send(c, url, Some(token)).await;
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        n += f?.into_data().map(|d| d.len() as u64).unwrap_or(0);
    }
    Ok(n as f64 / t.elapsed().as_secs_f64() / (1024.0 * 1024.0))
}

/// CPU time processes have used: user and system (kernel) seconds, read from
/// `/proc/<pid>/stat`. The system part is mostly the kernel's loopback TCP, which on
/// loopback also runs the receiving side's processing in the sender's time.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cpu {
    user: f64,
    sys: f64,
}

impl Cpu {
    /// What the processes `pids` have used so far.
    pub(crate) fn of(pids: &[u32]) -> Cpu {
        static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
        let ticks = *TICKS.get_or_init(|| {
            std::process::Command::new("getconf")
                .arg("CLK_TCK")
                .output()
                .ok()
                .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
                .unwrap_or(100.0)
        });
        pids.iter()
            .map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // utime and stime: fields 14 and 15, the 12th and 13th after the command.
                let fields: Vec<&str> = stat
                    .rsplit_once(')')
                    .map(|(_, rest)| rest.split_whitespace().collect())
                    .unwrap_or_default();
                let t = |i: usize| {
                    fields
                        .get(i)
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0)
                        / ticks
                };
                Cpu {
                    user: t(11),
                    sys: t(12),
                }
            })
            .sum()
    }

    /// Microseconds per request of what was used since `before`, over `requests`.
    pub(crate) fn per_request_since(self, before: Cpu, requests: f64) -> Cpu {
        let per = |now: f64, then: f64| (now - then) * 1e6 / requests.max(1.0);
        Cpu {
            user: per(self.user, before.user),
            sys: per(self.sys, before.sys),
        }
    }

    pub(crate) fn total(self) -> f64 {
        self.user + self.sys
    }
}

impl std::iter::Sum for Cpu {
    fn sum<I: Iterator<Item = Cpu>>(iter: I) -> Cpu {
        iter.fold(Cpu::default(), |a, b| Cpu {
            user: a.user + b.user,
            sys: a.sys + b.sys,
        })
    }
}

impl std::fmt::Display for Cpu {
    /// `12.3 us (user 8.1, system 4.2)`, for a per-request figure.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} us (user {:.1}, system {:.1})",
            self.total(),
            self.user,
            self.sys
        )
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.routing_only {
        return routing::run(args.requests, args.seconds, args.registry_agents).await;
    }
    let cfg_dir = tempfile::tempdir()?;
    let setup = Setup::start(&args, cfg_dir.path()).await?;
    if args.profile_only {
        let (tp, _) =
            throughput(&setup.proxy_c, &setup.proxied, &setup.ci, 32, args.seconds).await?;
        println!(
            "proxy {tp:.0} req/s; kas pid {} agentk pid {}",
            setup.env.kas.pid(),
            setup.env.agents[0].pid()
        );
        return Ok(());
    }
    if !args.memory_only {
        setup.measure(&args).await?;
    }
    if !args.skip_nginx && !args.memory_only {
        nginx::run(
            setup.addr,
            &setup.token,
            args.requests,
            args.seconds,
            args.stream_mib,
        )
        .await?;
    }
    if args.agents > 0 {
        setup.idle_agents(&args).await?;
    }
    if !args.skip_routing && !args.memory_only {
        drop(setup);
        routing::run(args.requests, args.seconds, args.registry_agents).await?;
    }
    Ok(())
}

/// kas, agentk and the backend running, with a CI job's token for the proxy.
struct Setup {
    env: Env,
    /// The backend's address and token (the direct path).
    addr: std::net::SocketAddr,
    token: String,
    /// The cluster kubeconfig agentk uses (pointing at the backend).
    kubeconfig: std::path::PathBuf,
    ci: String,
    direct_c: tclient::HttpsClient,
    proxy_c: tclient::HttpsClient,
    direct: String,
    proxied: String,
    /// The CA of kas's agent listener certificate (PEM), with `--agent-tls`.
    agent_ca_pem: Option<Vec<u8>>,
}

impl Setup {
    async fn start(args: &Args, cfg_dir: &std::path::Path) -> Result<Setup> {
        let mut extra: Vec<String> = args.kas_arg.clone();
        let mut yaml = String::new();
        if args.plaintext {
            yaml.push_str("k8s_proxy:\n  plaintext: true\n");
        }
        let agent_ca = if args.agent_tls {
            let tls = kas_test_support::certs::LocalhostCert::generate();
            let (crt, key) = (cfg_dir.join("agent.crt"), cfg_dir.join("agent.key"));
            std::fs::write(&crt, &tls.cert)?;
            std::fs::write(&key, &tls.key)?;
            yaml.push_str(&format!(
                "agent:\n  tls:\n    certificate_file: {}\n    key_file: {}\n",
                crt.display(),
                key.display()
            ));
            let ca = cfg_dir.join("agent-ca.pem");
            std::fs::write(&ca, &tls.ca)?;
            Some((ca, tls.ca.into_bytes()))
        } else {
            None
        };
        if !yaml.is_empty() {
            let f = cfg_dir.join("kas.yaml");
            std::fs::write(&f, yaml)?;
            extra.extend([
                "--config".to_string(),
                f.to_str().context("path")?.to_string(),
            ]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut env = Env::start_with(&extra).await;
        let token = env.api.token.clone();
        let addr = backend(token.clone()).await?;
        // agentk talks to the bench backend, not the test API server.
        let kubeconfig = env.path("bench-cluster.yaml");
        std::fs::write(
            &kubeconfig,
            env.api
                .kubeconfig()
                .replace(&env.api.url(), &format!("http://{addr}")),
        )?;
        env.cluster_kubeconfig = kubeconfig.clone();
        env.kasctl(&["project", "create", "bench/app"]);
        let (agent, agent_token) = env.create_agent(
            "bench/agents",
            "a",
            "ci_access:\n  groups:\n    - id: bench\n",
        );
        match &agent_ca {
            Some((ca, _)) => {
                env.start_agentk(&agent_token, &["--ca-cert", ca.to_str().context("path")?])
            }
            None => env.start_agentk(&agent_token, &[]),
        };
        env.wait_connected(agent, 1);
        let job = env.start_job("bench/app", None, "bench");
        let ci = format!("ci:{agent}:{}", job.token);
        // Plain HTTP needs no CA.
        let ca = if args.plaintext {
            Vec::new()
        } else {
            env.proxy_ca()
        };
        let direct_c = tclient::client(&ca, false);
        let proxy_c = tclient::client(&ca, false);
        let direct = format!("http://{addr}/api/v1/namespaces/default/pods");
        let proxied = format!("{}/api/v1/namespaces/default/pods", env.proxy_url());
        Ok(Setup {
            env,
            addr,
            token,
            kubeconfig,
            ci,
            direct_c,
            proxy_c,
            direct,
            proxied,
            agent_ca_pem: agent_ca.map(|(_, pem)| pem),
        })
    }

    /// (a) and (b): the small GET and the streamed response, direct and proxied.
    async fn measure(&self, args: &Args) -> Result<()> {
        let Setup {
            env,
            addr,
            token,
            ci,
            direct_c,
            proxy_c,
            direct,
            proxied,
            ..
        } = self;
        let scheme = if args.plaintext { "HTTP" } else { "HTTPS" };
        println!("# kas benchmark (direct = the same backend without kas; proxy = {scheme} to kas -> tunnel -> agentk -> backend)");
        let (kas_pid, agentk_pid) = (self.env.kas.pid(), self.env.agents[0].pid());
        let (kas0, agentk0) = (Cpu::of(&[kas_pid]), Cpu::of(&[agentk_pid]));
        let (d, p) = latency(
            (direct_c, direct, token),
            (proxy_c, proxied, ci),
            args.requests,
        )
        .await?;
        let served = (args.requests + LATENCY_WARMUP) as f64;
        let (kas1, agentk1) = (
            Cpu::of(&[kas_pid]).per_request_since(kas0, served),
            Cpu::of(&[agentk_pid]).per_request_since(agentk0, served),
        );
        println!(
            "(a) small GET, concurrency 1, {} requests each, interleaved",
            args.requests
        );
        report_latency(("direct", &d), ("proxy", &p), "   (target p50 <= 100 us)");
        report_cpu(&[("kas", kas1), ("agentk", agentk1)]);
        let (td, _) = throughput(direct_c, direct, token, 32, args.seconds).await?;
        let (kas0, agentk0) = (Cpu::of(&[kas_pid]), Cpu::of(&[agentk_pid]));
        let (tp, served) = throughput(proxy_c, proxied, ci, 32, args.seconds).await?;
        let (kas32, agentk32) = (
            Cpu::of(&[kas_pid]).per_request_since(kas0, served),
            Cpu::of(&[agentk_pid]).per_request_since(agentk0, served),
        );
        println!("(a) small GET, concurrency 32, {} s each", args.seconds);
        println!(
            "    direct {td:9.0} req/s   proxy {tp:9.0} req/s   ratio {:.2}x   (target >= 0.5x)",
            tp / td
        );
        report_cpu(&[("kas", kas32), ("agentk", agentk32)]);

        let sd = stream(
            direct_c,
            &format!("http://{addr}/bytes?n={}", args.stream_mib << 20),
            token,
        )
        .await?;
        let sp = stream(
            proxy_c,
            &format!("{}/bytes?n={}", env.proxy_url(), args.stream_mib << 20),
            ci,
        )
        .await?;
        println!("(b) {} MiB streamed response", args.stream_mib);
        println!(
            "    direct {sd:8.0} MiB/s   proxy {sp:8.0} MiB/s   ratio {:.2}x   (target >= 0.5x)",
            sp / sd
        );
        println!(
            "    peak RSS during the run: kas {} MiB, agentk {} MiB",
            env.kas.peak_rss_kib() / 1024,
            env.agents[0].peak_rss_kib() / 1024
        );
        Ok(())
    }

    /// (c) idle agents: register them, connect them from this process, measure kas.
    async fn idle_agents(&self, args: &Args) -> Result<()> {
        let Setup {
            env,
            kubeconfig,
            agent_ca_pem,
            ..
        } = self;
        let n = args.agents;
        let admin_c = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<Full<Bytes>>();
        let tokens = create_agents(&admin_c, &env.kas_info, n).await?;
        let access = agentk::ClusterAccess::from_kubeconfig(kubeconfig, None).await?;
        let upstream = Arc::new(agentk::Upstream::new(access)?);
        let kas_pid = env.kas.pid();
        let metrics_url = format!("{}/metrics", env.kas_info.observability);
        let before = proc_status_kib(kas_pid, "VmRSS:");
        let heap_before = heap_allocated(&admin_c, &metrics_url).await;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // Agents arrive at 2,000 a second rather than all at once: started together, each
        // one's first call to the cluster opened its own connection in this process,
        // which ran out of file descriptors at 15,000 agents.
        let mut pace = tokio::time::interval(Duration::from_micros(500));
        for (i, t) in tokens.into_iter().enumerate() {
            pace.tick().await;
            let opts = agentk::ConnectOptions {
                kas_addresses: vec![env.kas_info.agent.clone()],
                token: t,
                ca_cert_pem: agent_ca_pem.clone(),
                min_idle_tunnels: args.idle_tunnels,
                max_tunnels: 512,
                replica_id: format!("bench-{i}"),
                kas_headers: Vec::new(),
                tls_server_name: None,
                insecure_skip_tls_verify: false,
                proxy: Default::default(),
            };
            let (ctx, _crx) = tokio::sync::watch::channel(None);
            tokio::spawn(agentk::run(opts, upstream.clone(), ctx, stop_rx.clone()));
        }
        let start = Instant::now();
        let check = env.kas_info.clone();
        let idle_per_agent = args.idle_tunnels as u64;
        tokio::task::spawn_blocking(move || {
            wait_for(
                Duration::from_secs(120),
                "all idle agents to connect",
                || {
                    let out =
                        kas_test_support::procs::kasctl_raw(&check, &["agents", "-o", "json"]);
                    let agents: Vec<admin::NamedConnectedAgent> =
                        serde_json::from_slice(&out.stdout).ok()?;
                    let idle = agents
                        .iter()
                        .filter(|a| {
                            a.name.starts_with("idle-")
                                && a.state.idle_tunnels as u64 == idle_per_agent
                        })
                        .count();
                    if progress_tick() {
                        eprintln!("  ... {idle} of {n} idle agents connected");
                    }
                    (idle >= n).then_some(())
                },
            )
        })
        .await?;
        let connected_in = start.elapsed();
        // A connection busy in its last second keeps its h2 buffers until its next
        // frame (vendor/h2): for idle agents, their next keepalive ping.
        tokio::time::sleep(agentk::connection::KEEPALIVE_INTERVAL + Duration::from_secs(2)).await;
        let after = settled_rss_kib(kas_pid).await;
        let heap_after = heap_allocated(&admin_c, &metrics_url).await;
        println!(
            "(c) {n} idle agents ({} idle tunnels each, {}) connected in {:.1} s",
            args.idle_tunnels,
            if agent_ca_pem.is_some() {
                "TLS"
            } else {
                "plain gRPC"
            },
            connected_in.as_secs_f64()
        );
        println!(
            "    kas RSS {} MiB -> {} MiB: {:.1} KiB per idle agent   (target <= 24 KiB)",
            before / 1024,
            after / 1024,
            (after.saturating_sub(before)) as f64 / n as f64
        );
        if let (Some(b), Some(a)) = (heap_before, heap_after) {
            println!(
                "    kas heap in live allocations: {:.1} KiB per idle agent",
                a.saturating_sub(b) as f64 / 1024.0 / n as f64
            );
        }
        let _ = stop_tx.send(true);
        Ok(())
    }
}

/// Registers `n` agents `bench/agents:idle-<i>` through the admin API: their tokens.
async fn create_agents(
    admin_c: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    kas: &kas_test_support::procs::KasInfo,
    n: usize,
) -> Result<Vec<String>> {
    let api = &kas.api;
    let admin = std::fs::read_to_string(&kas.admin_token_file)?
        .trim()
        .to_string();
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        let create = admin::AgentName {
            project: "bench/agents".into(),
            name: format!("idle-{i}"),
        };
        let req = hyper::Request::post(format!("{api}{}{}", admin::PREFIX, admin::paths::AGENTS))
            .header("authorization", format!("Bearer {admin}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&create)?)))?;
        let resp = admin_c.request(req).await?;
        let created: admin::CreatedAgent =
            serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
        tokens.push(created.token);
    }
    Ok(tokens)
}

/// RSS of `pid` in KiB once it stops falling: memory freed after the connection burst
/// (handshakes) goes back to the kernel over some seconds.
async fn settled_rss_kib(pid: u32) -> u64 {
    let mut rss = proc_status_kib(pid, "VmRSS:");
    let mut steady = 0;
    let settle = Instant::now();
    while steady < 3 && settle.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = proc_status_kib(pid, "VmRSS:");
        steady = if now + 64 >= rss { steady + 1 } else { 0 };
        rss = rss.min(now);
    }
    rss
}

/// `kas_heap_allocated_bytes` from kas's metrics (absent without jemalloc).
async fn heap_allocated(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    url: &str,
) -> Option<u64> {
    let resp = client.get(url.parse().ok()?).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    std::str::from_utf8(&body).ok()?.lines().find_map(|l| {
        l.strip_prefix("kas_heap_allocated_bytes ")
            .and_then(|v| v.trim().parse().ok())
    })
}

/// True every 50th call: about once a second when polled every 20 ms (progress output).
fn progress_tick() -> bool {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed).is_multiple_of(50)
}
