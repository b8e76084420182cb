//! Reference points: the same backend behind one nginx hop (HTTPS to nginx, plain
//! HTTP/1.1 with keep-alive to the backend, buffering off (as watch streams need) with
//! 256 KiB reads, a buffered access log, as one would tune it for an API proxy), and
//! behind two such hops in series (HTTPS -> nginx -> nginx -> backend, the fair
//! reference for kas + agentk, which are two hops by design), measured like the kas
//! path in the same run, with the CPU time per request of the nginx processes.
//! Skipped when `nginx` is not installed (Debian package `nginx`).

use crate::{latency, report_cpu, report_latency, stream, throughput, Cpu};
use anyhow::{bail, Context, Result};
use kas_test_support::certs::LocalhostCert;
use kas_test_support::http as tclient;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// nginx in the foreground, stopped on drop.
struct Nginx {
    master: Child,
    conf: std::path::PathBuf,
    prefix: std::path::PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // `-s stop` makes the master stop its workers; killing the master would
        // leave them running.
        let stopped = Command::new("nginx")
            .arg("-c")
            .arg(&self.conf)
            .arg("-p")
            .arg(&self.prefix)
            .args(["-s", "stop"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.master.kill();
        }
        let _ = self.master.wait();
    }
}

impl Nginx {
    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.master.id();
        let mut pids = vec![master];
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // The parent pid is the second field after the command, which may hold spaces.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(master) {
                if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse().ok()) {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

/// nginx proxying to `upstream`, with TLS when `tls` is given.
fn start(dir: &Path, upstream: SocketAddr, tls: Option<&LocalhostCert>) -> Result<(Nginx, u16)> {
    let port = kas_test_support::services::free_port();
    let d = dir.display();
    let ssl = match tls {
        Some(tls) => {
            std::fs::write(dir.join("tls.crt"), &tls.cert)?;
            std::fs::write(dir.join("tls.key"), &tls.key)?;
            format!(" ssl;\n    ssl_certificate {d}/tls.crt;\n    ssl_certificate_key {d}/tls.key")
        }
        None => String::new(),
    };
    let conf = format!(
        r#"daemon off;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log {d}/access.log combined buffer=64k flush=1s;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream backend {{ server {upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port}{ssl};
    keepalive_requests 100000;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_buffer_size 256k;
      proxy_buffers 4 256k;
      proxy_busy_buffers_size 256k;
    }}
  }}
}}
"#
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let master = Command::new("nginx")
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log"))?)
        .spawn()
        .context("starting nginx")?;
    let mut nginx = Nginx {
        master,
        conf: conf_path,
        prefix: dir.to_path_buf(),
    };
    // Ready when it accepts connections.
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((nginx, port));
        }
        if nginx.master.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!(
        "nginx did not start: {}{}",
        std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default(),
        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
    )
}

/// Measures one nginx hop, then two in series, against the direct path; prints the
/// same lines as (a)/(b) and the CPU time per request of the nginx processes.
pub async fn run(
    backend: SocketAddr,
    token: &str,
    requests: usize,
    seconds: u64,
    stream_mib: u64,
) -> Result<()> {
    let installed = Command::new("nginx")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        println!("(ref) nginx not installed: no nginx reference measured");
        return Ok(());
    }
    let (one, two, inner) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let tls = LocalhostCert::generate();
    let (single, port) = start(one.path(), backend, Some(&tls))?;
    let m = Measure {
        backend,
        token,
        requests,
        seconds,
        stream_mib,
        ca: &tls.ca,
    };
    m.hops("one nginx hop: HTTPS -> nginx -> backend", port, &[&single])
        .await?;
    drop(single);
    let (second, inner_port) = start(inner.path(), backend, None)?;
    let inner_addr: SocketAddr = format!("127.0.0.1:{inner_port}").parse()?;
    let (first, port) = start(two.path(), inner_addr, Some(&tls))?;
    m.hops(
        "two nginx hops: HTTPS -> nginx -> nginx -> backend",
        port,
        &[&first, &second],
    )
    .await
}

/// What the reference measurements share.
struct Measure<'a> {
    backend: SocketAddr,
    token: &'a str,
    requests: usize,
    seconds: u64,
    stream_mib: u64,
    ca: &'a str,
}

impl Measure<'_> {
    async fn hops(&self, title: &str, port: u16, nginx: &[&Nginx]) -> Result<()> {
        let (backend, token) = (self.backend, self.token);
        let direct_c = tclient::client(&[], false);
        let nginx_c = tclient::client(self.ca.as_bytes(), false);
        let direct = format!("http://{backend}/api/v1/namespaces/default/pods");
        let via = format!("https://127.0.0.1:{port}/api/v1/namespaces/default/pods");
        println!("(ref) {title}, same measurements");
        let pids: Vec<u32> = nginx.iter().flat_map(|n| n.pids()).collect();
        let before = Cpu::of(&pids);
        let (d, n) = latency(
            (&direct_c, &direct, token),
            (&nginx_c, &via, token),
            self.requests,
        )
        .await?;
        let served = (self.requests + crate::LATENCY_WARMUP) as f64;
        let cpu1 = Cpu::of(&pids).per_request_since(before, served);
        report_latency(("direct", &d), ("nginx", &n), "");
        report_cpu(&[("nginx", cpu1)]);
        let (td, _) = throughput(&direct_c, &direct, token, 32, self.seconds).await?;
        let before = Cpu::of(&pids);
        let (tn, served) = throughput(&nginx_c, &via, token, 32, self.seconds).await?;
        let cpu32 = Cpu::of(&pids).per_request_since(before, served);
        println!(
            "    concurrency 32: direct {td:9.0} req/s   nginx {tn:9.0} req/s   ratio {:.2}x",
            tn / td
        );
        report_cpu(&[("nginx", cpu32)]);
        let n = self.stream_mib << 20;
        let sd = stream(&direct_c, &format!("http://{backend}/bytes?n={n}"), token).await?;
        let sn = stream(
            &nginx_c,
            &format!("https://127.0.0.1:{port}/bytes?n={n}"),
            token,
        )
        .await?;
        println!(
            "    {} MiB stream: direct {sd:8.0} MiB/s   nginx {sn:8.0} MiB/s   ratio {:.2}x",
            self.stream_mib,
            sn / sd
        );
        Ok(())
    }
}
