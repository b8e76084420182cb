//! A reference point: the same backend behind one nginx hop (HTTPS to nginx, plain
//! HTTP/1.1 with keep-alive to the backend, buffering off (as watch streams need) with
//! 256 KiB reads, a buffered access log, as
//! one would tune it for an API proxy), measured like the kas path in the same run.
//! Skipped when `nginx` is not installed.

use crate::{latency, report_latency, stream, throughput};
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

fn start(dir: &Path, backend: SocketAddr, tls: &LocalhostCert) -> Result<(Nginx, u16)> {
    std::fs::write(dir.join("tls.crt"), &tls.cert)?;
    std::fs::write(dir.join("tls.key"), &tls.key)?;
    let port = kas_test_support::services::free_port();
    let d = dir.display();
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
  upstream backend {{ server {backend}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {d}/tls.crt;
    ssl_certificate_key {d}/tls.key;
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

/// Measures one nginx hop against the direct path; prints the same lines as (a)/(b).
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
    let dir = tempfile::tempdir()?;
    let tls = LocalhostCert::generate();
    let (_nginx, port) = start(dir.path(), backend, &tls)?;
    let direct_c = tclient::client(&[], false);
    let nginx_c = tclient::client(tls.ca.as_bytes(), false);
    let direct = format!("http://{backend}/api/v1/namespaces/default/pods");
    let via = format!("https://127.0.0.1:{port}/api/v1/namespaces/default/pods");
    println!("(ref) one nginx hop: HTTPS -> nginx -> backend, same measurements");
    let (d, n) = latency(
        (&direct_c, &direct, token),
        (&nginx_c, &via, token),
        requests,
    )
    .await?;
    report_latency(("direct", &d), ("nginx", &n), "");
    let td = throughput(&direct_c, &direct, token, 32, seconds).await?;
    let tn = throughput(&nginx_c, &via, token, 32, seconds).await?;
    println!(
        "    concurrency 32: direct {td:9.0} req/s   nginx {tn:9.0} req/s   ratio {:.2}x",
        tn / td
    );
    let sd = stream(
        &direct_c,
        &format!("http://{backend}/bytes?n={}", stream_mib << 20),
        token,
    )
    .await?;
    let sn = stream(
        &nginx_c,
        &format!("https://127.0.0.1:{port}/bytes?n={}", stream_mib << 20),
        token,
    )
    .await?;
    println!(
        "    {stream_mib} MiB stream: direct {sd:8.0} MiB/s   nginx {sn:8.0} MiB/s   ratio {:.2}x",
        sn / sd
    );
    Ok(())
}
