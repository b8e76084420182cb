//! Real redis-server and PostgreSQL for tests: each started on a free port in its own
//! temporary directory and stopped on drop, so tests run in parallel on any machine
//! with the Debian packages installed (none depends on the machine's own services).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tempfile::TempDir;

/// A port that was free a moment ago (the OS picks it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until a line of the child's output (stdout or stderr, `pipe`) contains
/// `ready`; the output seen if it exits first or takes longer than `timeout`.
fn wait_ready(
    child: &mut Child,
    ready: &'static str,
    what: &str,
    timeout: Duration,
) -> Result<(), String> {
    let out: Box<dyn std::io::Read + Send> = match (child.stdout.take(), child.stderr.take()) {
        (Some(o), _) => Box::new(o),
        (None, Some(e)) => Box::new(e),
        (None, None) => return Err(format!("{what}: no output to watch")),
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        let mut signalled = false;
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if !signalled {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(ready) {
                    signalled = true;
                    let _ = tx.send(Ok(()));
                }
            }
            // Keep draining so the child never blocks on a full pipe.
        }
        if !signalled {
            let _ = tx.send(Err(seen));
        }
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(seen)) => Err(format!("{what} exited before it was ready:\n{seen}")),
        Err(_) => Err(format!("{what} not ready within {timeout:?}")),
    }
}

/// A redis-server on a free port, in a temp dir, killed on drop. Nothing persisted.
pub struct Redis {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// Started once: restarts keep the port.
    started: bool,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut r = Redis {
            port: free_port(),
            dir,
            child: None,
            started: false,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL): its data is gone, like a crashed Redis without
    /// persistence.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)starts the server on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        // A port picked free can be taken by the time the server binds: pick another
        // (only before the first start; a restart must keep its port).
        for attempt in 0.. {
            match self.launch() {
                Ok(c) => {
                    self.child = Some(c);
                    return;
                }
                Err(_) if attempt < 3 && !self.started => self.port = free_port(),
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn launch(&mut self) -> Result<Child, String> {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed (Debian package redis-server)");
        if let Err(e) = wait_ready(
            &mut child,
            "Ready to accept connections",
            "redis-server",
            Duration::from_secs(20),
        ) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        self.started = true;
        Ok(child)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL server on a free port, in a temp dir, with trust authentication for
/// user `postgres`; stopped on drop. When the tests run as root it runs as the
/// `postgres` system user (PostgreSQL refuses to run as root).
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    user: Option<(u32, u32)>,
    /// `-c` settings added to the defaults.
    settings: Vec<String>,
    child: Option<Child>,
    _dir: TempDir,
}

fn pg_bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").is_file() {
            return p;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    found.sort();
    found
        .pop()
        .expect("PostgreSQL server binaries not found (Debian package postgresql)")
}

/// uid and gid of a system user, from /etc/passwd.
fn system_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

impl Postgres {
    pub fn start() -> Postgres {
        Self::start_with(None)
    }

    /// A server that also offers TLS with `cert` (certificate and key PEM).
    pub fn start_tls(cert: &crate::certs::LocalhostCert) -> Postgres {
        Self::start_with(Some(cert))
    }

    fn start_with(tls: Option<&crate::certs::LocalhostCert>) -> Postgres {
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().expect("temp dir");
        let user = if is_root() {
            let u = system_user("postgres").expect("running as root needs a `postgres` user");
            std::os::unix::fs::chown(dir.path(), Some(u.0), Some(u.1)).expect("chown temp dir");
            Some(u)
        } else {
            None
        };
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_user(&mut initdb, user);
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut settings = Vec::new();
        if let Some(tls) = tls {
            for (name, pem) in [("server.crt", &tls.cert), ("server.key", &tls.key)] {
                let path = data.join(name);
                std::fs::write(&path, pem).expect("write TLS file");
                // PostgreSQL refuses a key others can read, or one it does not own.
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .expect("chmod TLS file");
                if let Some((uid, gid)) = user {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown TLS file");
                }
            }
            settings = [
                "ssl=on",
                "ssl_cert_file=server.crt",
                "ssl_key_file=server.key",
            ]
            .map(String::from)
            .to_vec();
        }
        let mut pg = Postgres {
            port: free_port(),
            bin,
            data,
            user,
            settings,
            child: None,
            _dir: dir,
        };
        for attempt in 0.. {
            match pg.launch() {
                Ok(()) => break,
                // The free port was taken meanwhile: try another.
                Err(_) if attempt < 3 => pg.port = free_port(),
                Err(e) => panic!("{e}"),
            }
        }
        pg
    }

    fn launch(&mut self) -> Result<(), String> {
        let sock = self
            .data
            .parent()
            .unwrap_or(Path::new("/tmp"))
            .to_path_buf();
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&sock)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=300", "-c", "full_page_writes=off"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .current_dir(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_user(&mut cmd, self.user);
        let mut child = cmd.spawn().expect("start postgres");
        if let Err(e) = wait_ready(
            &mut child,
            "ready to accept connections",
            "postgres",
            Duration::from_secs(60),
        ) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Immediate shutdown: the postmaster takes its backends down with it.
            let mut stop = Command::new(self.bin.join("pg_ctl"));
            stop.arg("stop")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-s"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            as_user(&mut stop, self.user);
            if !stop.status().is_ok_and(|s| s.success()) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// tinyproxy (Debian package `tinyproxy`), a forward HTTP proxy on a free port that
/// allows CONNECT to the given ports only, optionally with basic credentials; its log
/// is kept for assertions. Killed on drop.
pub struct Tinyproxy {
    pub port: u16,
    _dir: TempDir,
    log: PathBuf,
    child: Child,
}

impl Tinyproxy {
    pub fn start(credentials: Option<(&str, &str)>, connect_ports: &[u16]) -> Tinyproxy {
        let dir = tempfile::tempdir().expect("temp dir");
        for _ in 0..3 {
            let port = free_port();
            let mut conf = format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 600\nAllow 127.0.0.1\nLogLevel Info\nMaxClients 100\n"
            );
            if let Some((u, p)) = credentials {
                conf.push_str(&format!("BasicAuth {u} {p}\n"));
            }
            for p in connect_ports {
                conf.push_str(&format!("ConnectPort {p}\n"));
            }
            let conf_path = dir.path().join("tinyproxy.conf");
            std::fs::write(&conf_path, conf).expect("write config");
            let log = dir.path().join("tinyproxy.log");
            let mut child = Command::new("tinyproxy")
                .arg("-d")
                .arg("-c")
                .arg(&conf_path)
                .stdout(std::fs::File::create(&log).expect("log"))
                .stderr(Stdio::null())
                .spawn()
                .expect("tinyproxy is not installed (Debian package tinyproxy)");
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("Accepting connections") {
                    return Tinyproxy {
                        port,
                        _dir: dir,
                        log,
                        child,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken: try another
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("tinyproxy did not start");
    }

    /// `http://[user:password@]127.0.0.1:<port>`.
    pub fn url(&self, credentials: Option<(&str, &str)>) -> String {
        match credentials {
            Some((u, p)) => format!("http://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
