//! The processes `exec` and `attach` run in a test pod, over a small in-memory file
//! system per pod. Enough for what kubectl does through `exec`, `attach` and `cp`:
//!
//! - `echo ARGS`, `true`, `false`, `test -d|-f|-e PATH`;
//! - `cat FILE...` prints files; `cat` alone (and `sh`, `bash`, and `attach`) copies
//!   stdin to stdout until stdin closes;
//! - `tar` with `x` reads an archive from stdin into the file system (under `-C DIR`),
//!   with `c` writes an archive of the paths to stdout, as GNU tar names members
//!   (leading `/` removed).
//!
//! Any other command fails as a container runtime does: "executable file not found".

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use tokio::sync::mpsc;

/// One pod's files: absolute normalized paths to contents (`None` for directories).
#[derive(Debug)]
struct Fs(BTreeMap<String, Option<Vec<u8>>>);

/// A path and its contents (`None` for a directory).
type Entry = (String, Option<Vec<u8>>);

impl Default for Fs {
    fn default() -> Self {
        Fs(["/", "/tmp", "/etc"]
            .into_iter()
            .map(|d| (d.to_string(), None))
            .chain([("/etc/hostname".to_string(), Some(b"test-pod\n".to_vec()))])
            .collect())
    }
}

/// The files of every pod, by namespace and name.
#[derive(Debug, Default)]
pub(super) struct Files(Mutex<HashMap<(String, String), Fs>>);

impl Files {
    fn with<R>(&self, pod: &(String, String), f: impl FnOnce(&mut Fs) -> R) -> R {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(all.entry(pod.clone()).or_default())
    }
}

/// Joins `path` onto `base` and normalizes it; `None` when it climbs above `/`.
fn resolve(base: &str, path: &str) -> Option<String> {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{base}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

impl Fs {
    fn mkdir_all(&mut self, p: &str) {
        let mut cur = String::new();
        for c in p.split('/').filter(|c| !c.is_empty()) {
            cur.push('/');
            cur.push_str(c);
            self.0.entry(cur.clone()).or_insert(None);
        }
    }

    fn write(&mut self, p: &str, data: Vec<u8>) {
        if let Some((parent, _)) = p.rsplit_once('/') {
            self.mkdir_all(parent);
        }
        self.0.insert(p.to_string(), Some(data));
    }

    /// `p` and, for a directory, everything under it, in path order.
    fn tree(&self, p: &str) -> Vec<Entry> {
        let prefix = if p == "/" {
            "/".to_string()
        } else {
            format!("{p}/")
        };
        self.0
            .range(p.to_string()..)
            .take_while(|(k, _)| *k == p || k.starts_with(&prefix))
            .filter(|(k, _)| *k == p || k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A process's standard streams: stdin ends when the client closes it.
pub(super) struct Stdio {
    pub stdin: mpsc::Receiver<Bytes>,
    pub stdout: mpsc::Sender<Bytes>,
    pub stderr: mpsc::Sender<Bytes>,
}

impl Stdio {
    async fn out(&self, data: impl Into<Bytes>) {
        let _ = self.stdout.send(data.into()).await;
    }

    async fn err(&self, msg: String) {
        let _ = self.stderr.send(Bytes::from(msg)).await;
    }

    async fn read_all(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(b) = self.stdin.recv().await {
            all.extend_from_slice(&b);
        }
        all
    }
}

/// Runs `command` in the pod and returns its exit code.
pub(super) async fn run(
    files: &Files,
    pod: (String, String),
    command: &[String],
    mut io: Stdio,
) -> i32 {
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["echo", rest @ ..] => {
            io.out(format!("{}\n", rest.join(" "))).await;
            0
        }
        ["true"] => 0,
        ["false"] => 1,
        ["test", flag @ ("-d" | "-f" | "-e"), path] => {
            let Some(p) = resolve("/", path) else {
                return 1;
            };
            let found = files.with(&pod, |fs| fs.0.get(&p).cloned());
            let ok = matches!(
                (*flag, found),
                ("-d", Some(None)) | ("-f", Some(Some(_))) | ("-e", Some(_))
            );
            i32::from(!ok)
        }
        [] | ["cat"] | ["sh" | "bash" | "/bin/sh" | "/bin/bash", ..] => {
            while let Some(b) = io.stdin.recv().await {
                if io.stdout.send(b).await.is_err() {
                    break;
                }
            }
            0
        }
        ["cat", paths @ ..] => {
            let mut code = 0;
            for path in paths {
                let content =
                    resolve("/", path).and_then(|p| files.with(&pod, |fs| fs.0.get(&p).cloned()));
                match content {
                    Some(Some(data)) => io.out(data).await,
                    Some(None) => {
                        io.err(format!("cat: {path}: Is a directory\n")).await;
                        code = 1;
                    }
                    None => {
                        io.err(format!("cat: {path}: No such file or directory\n"))
                            .await;
                        code = 1;
                    }
                }
            }
            code
        }
        ["tar", rest @ ..] => tar(files, pod, rest, io).await,
        [cmd, ..] => {
            io.err(format!(
                "OCI runtime exec failed: exec failed: unable to start container process: exec: \"{cmd}\": executable file not found in $PATH: unknown\r\n"
            ))
            .await;
            126
        }
    }
}

/// `tar` as kubectl's `cp` runs it: `tar cf - PATH...` and `tar -xmf - [-C DIR]`.
async fn tar(files: &Files, pod: (String, String), args: &[&str], mut io: Stdio) -> i32 {
    let mut dir = "/".to_string();
    let mut mode = None;
    let mut paths = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "-C" => match it.next() {
                Some(d) => dir = resolve("/", d).unwrap_or_else(|| "/".into()),
                None => {
                    io.err("tar: option requires an argument -- 'C'\n".into())
                        .await;
                    return 2;
                }
            },
            "-" => {}
            a if a.starts_with("--") => {}
            a if mode.is_none() && a.trim_start_matches('-').contains(['x', 'c']) => {
                mode = Some(if a.contains('x') { 'x' } else { 'c' });
            }
            a => paths.push(a),
        }
    }
    match mode {
        Some('x') => tar_extract(files, &pod, &dir, &mut io).await,
        Some(_) => tar_create(files, &pod, &dir, &paths, &mut io).await,
        None => {
            io.err("tar: You must specify one of the '-Acdtrux' options\n".into())
                .await;
            2
        }
    }
}

/// `tar -x`: the archive on stdin written under `dir`.
async fn tar_extract(files: &Files, pod: &(String, String), dir: &str, io: &mut Stdio) -> i32 {
    let data = io.read_all().await;
    match untar(&data, dir) {
        Ok(entries) => {
            files.with(pod, |fs| {
                for (path, content) in entries {
                    match content {
                        None => fs.mkdir_all(&path),
                        Some(c) => fs.write(&path, c),
                    }
                }
            });
            0
        }
        Err(e) => {
            io.err(format!("tar: {e}\n")).await;
            2
        }
    }
}

/// `tar -c`: `paths` (relative to `dir`) as an archive on stdout.
async fn tar_create(
    files: &Files,
    pod: &(String, String),
    dir: &str,
    paths: &[&str],
    io: &mut Stdio,
) -> i32 {
    let mut code = 0;
    let mut builder = tar::Builder::new(Vec::new());
    for path in paths {
        let Some(p) = resolve(dir, path) else {
            continue;
        };
        let tree = files.with(pod, |fs| fs.tree(&p));
        if tree.is_empty() {
            io.err(format!(
                "tar: {path}: Cannot stat: No such file or directory\n"
            ))
            .await;
            code = 2;
            continue;
        }
        if path.starts_with('/') {
            io.err("tar: Removing leading `/' from member names\n".into())
                .await;
        }
        for (name, content) in tree {
            // Members are named as given (relative to -C), without a leading /.
            let rel = if dir == "/" || path.starts_with('/') {
                name.trim_start_matches('/').to_string()
            } else {
                name.strip_prefix(&format!("{dir}/"))
                    .unwrap_or(&name)
                    .to_string()
            };
            if rel.is_empty() {
                continue;
            }
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            let appended = match content {
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    builder.append_data(&mut h, format!("{rel}/"), &[][..])
                }
                Some(c) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(c.len() as u64);
                    builder.append_data(&mut h, &rel, &c[..])
                }
            };
            if let Err(e) = appended {
                io.err(format!("tar: {rel}: {e}\n")).await;
                code = 2;
            }
        }
    }
    match builder.into_inner() {
        Ok(archive) => io.out(archive).await,
        Err(e) => {
            io.err(format!("tar: {e}\n")).await;
            code = 2;
        }
    }
    code
}

/// The entries of an archive, placed under `dir`: (path, contents or `None` for a
/// directory). Members that would land outside `/` are refused.
fn untar(data: &[u8], dir: &str) -> Result<Vec<Entry>, String> {
    use std::io::Read;
    if !data.len().is_multiple_of(512) {
        return Err("Unexpected EOF in archive".into());
    }
    let mut out = Vec::new();
    let mut archive = tar::Archive::new(data);
    let entries = archive.entries().map_err(|e| e.to_string())?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| format!("This does not look like a tar archive ({e})"))?;
        let name = entry
            .path()
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned();
        let path = resolve(dir, name.trim_start_matches('/'))
            .ok_or_else(|| format!("{name}: Member name contains '..'"))?;
        match entry.header().entry_type() {
            tar::EntryType::Directory => out.push((path, None)),
            tar::EntryType::Regular | tar::EntryType::GNUSparse | tar::EntryType::Continuous => {
                let mut content = Vec::new();
                entry
                    .read_to_end(&mut content)
                    .map_err(|e| format!("{name}: {e}"))?;
                out.push((path, Some(content)));
            }
            // Links, devices and the like are not kept.
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> (String, String) {
        ("default".into(), "p".into())
    }

    async fn exec(files: &Files, cmd: &[&str], stdin: &[u8]) -> (i32, Vec<u8>, String) {
        let (in_tx, stdin_rx) = mpsc::channel(4);
        let (stdout, mut out_rx) = mpsc::channel(64);
        let (stderr, mut err_rx) = mpsc::channel(64);
        if !stdin.is_empty() {
            in_tx
                .send(Bytes::copy_from_slice(stdin))
                .await
                .expect("stdin");
        }
        drop(in_tx);
        let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        let code = run(
            files,
            pod(),
            &cmd,
            Stdio {
                stdin: stdin_rx,
                stdout,
                stderr,
            },
        )
        .await;
        let mut out = Vec::new();
        while let Some(b) = out_rx.recv().await {
            out.extend_from_slice(&b);
        }
        let mut err = String::new();
        while let Some(b) = err_rx.recv().await {
            err.push_str(&String::from_utf8_lossy(&b));
        }
        (code, out, err)
    }

    #[tokio::test]
    async fn tar_round_trips_through_the_pods_files() {
        let files = Files::default();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "dir/a.txt", &b"hello"[..])
            .expect("append");
        let archive = b.into_inner().expect("archive");
        let (code, _, err) = exec(&files, &["tar", "-xmf", "-", "-C", "/tmp"], &archive).await;
        assert_eq!((code, err.as_str()), (0, ""));
        assert_eq!(exec(&files, &["test", "-d", "/tmp/dir"], b"").await.0, 0);
        assert_eq!(
            exec(&files, &["test", "-d", "/tmp/dir/a.txt"], b"").await.0,
            1
        );
        assert_eq!(
            exec(&files, &["cat", "/tmp/dir/a.txt"], b"").await.1,
            b"hello"
        );

        let (code, out, err) = exec(&files, &["tar", "cf", "-", "/tmp/dir"], b"").await;
        assert_eq!(code, 0);
        assert!(err.contains("Removing leading"), "{err}");
        let names: Vec<String> = tar::Archive::new(&out[..])
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["tmp/dir/", "tmp/dir/a.txt"]);
    }

    #[tokio::test]
    async fn bad_input_fails_like_the_real_tools() {
        let files = Files::default();
        let (code, _, err) = exec(&files, &["tar", "-xmf", "-"], b"not a tar archive at all").await;
        assert_eq!(code, 2, "{err}");
        let (code, _, err) = exec(&files, &["tar", "cf", "-", "/nope"], b"").await;
        assert_eq!(code, 2);
        assert!(err.contains("No such file"), "{err}");
        let (code, _, err) = exec(&files, &["cat", "/nope"], b"").await;
        assert_eq!(
            (code, err.as_str()),
            (1, "cat: /nope: No such file or directory\n")
        );
        assert_eq!(exec(&files, &["nonexistent"], b"").await.0, 126);
        assert_eq!(resolve("/tmp", "../../.."), None);
    }
}
