//! `exec` and `attach` over WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`) and
//! over SPDY/3.1 (`v4.channel.k8s.io` streams), running [`process`]es; and pod logs
//! (with `follow`).
//!
//! As the kubelet does: on WebSocket, channel 0 is stdin, 1 stdout, 2 stderr, 3 the
//! final status (a `Status` object), and in v5 a message `[255, n]` closes channel n;
//! on SPDY the client opens one stream per channel (header `streamType`) and the
//! status goes on the `error` stream.

use super::process::{self, Stdio};
use super::{full, spdy, status, Body, State, StreamGuard};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

/// The 404 for a pod that does not exist.
pub(super) fn missing_pod(state: &State, ns: &str, name: &str) -> Option<Response<Body>> {
    let exists = state.lock().get("/pods", ns, name).is_some();
    (!exists).then(|| {
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pods \"{name}\" not found"),
        )
    })
}

pub(super) fn logs(state: &Arc<State>, ns: &str, name: &str, follow: bool) -> Response<Body> {
    if let Some(r) = missing_pod(state, ns, name) {
        return r;
    }
    let planned = state.planned(ns, name).and_then(|p| p.log);
    if !follow {
        let text = planned.unwrap_or_else(|| format!("{name}: line 1\n{name}: line 2\n"));
        return full(StatusCode::OK, "text/plain", text);
    }
    let guard = StreamGuard::new(state);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let (state, ns, name) = (state.clone(), ns.to_string(), name.to_string());
    tokio::spawn(async move {
        let _guard = guard;
        // As the kubelet does: the log so far, then lines as they come, until the
        // container ends (the pod finished or is gone).
        if let Some(text) = planned {
            if tx.send(Ok(Frame::data(Bytes::from(text)))).await.is_err() {
                return;
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for i in 1.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tx.closed() => return,
            }
            let phase = state
                .lock()
                .get("/pods", &ns, &name)
                .map(|p| p["status"]["phase"].as_str().unwrap_or("").to_string());
            match phase.as_deref() {
                None | Some("Succeeded" | "Failed") => return,
                _ if state.planned(&ns, &name).is_some() => {}
                _ => {
                    let line = Bytes::from(format!("{name}: line {i}\n"));
                    if tx.send(Ok(Frame::data(line))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut r = Response::new(
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync(),
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// How a client asked to switch protocols.
pub(super) enum Upgrade {
    /// WebSocket, with its key and the subprotocols offered.
    WebSocket { key: String, protocols: Vec<String> },
    /// SPDY/3.1, with the `X-Stream-Protocol-Version`s offered.
    Spdy { protocols: Vec<String> },
}

impl Upgrade {
    pub(super) fn of<B>(req: &Request<B>) -> Option<Upgrade> {
        let h = req.headers();
        let list = |name: &str| -> Vec<String> {
            h.get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let upgrade = h.get(header::UPGRADE)?.to_str().ok()?;
        if upgrade.eq_ignore_ascii_case("websocket") {
            let key = h.get("sec-websocket-key")?.to_str().ok()?.to_string();
            Some(Upgrade::WebSocket {
                key,
                protocols: list("sec-websocket-protocol"),
            })
        } else if upgrade.eq_ignore_ascii_case("SPDY/3.1") {
            Some(Upgrade::Spdy {
                protocols: list("x-stream-protocol-version"),
            })
        } else {
            None
        }
    }

    /// The first of `supported` the client offered.
    pub(super) fn pick(&self, supported: &[&'static str]) -> Option<&'static str> {
        let offered = match self {
            Upgrade::WebSocket { protocols, .. } | Upgrade::Spdy { protocols } => protocols,
        };
        supported
            .iter()
            .copied()
            .find(|p| offered.iter().any(|o| o == p))
    }

    /// Answers `101 Switching Protocols` agreeing on `protocol`, and once the
    /// connection has switched runs `session` on it (told whether it is WebSocket).
    pub(super) fn accept<F, Fut>(
        self,
        req: &mut Request<Incoming>,
        state: &Arc<State>,
        protocol: &'static str,
        session: F,
    ) -> Response<Body>
    where
        F: FnOnce(TokioIo<hyper::upgrade::Upgraded>, bool) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let on_upgrade = hyper::upgrade::on(req);
        let guard = StreamGuard::new(state);
        let websocket = matches!(self, Upgrade::WebSocket { .. });
        tokio::spawn(async move {
            let _guard = guard;
            if let Ok(upgraded) = on_upgrade.await {
                session(TokioIo::new(upgraded), websocket).await;
            }
        });
        self.switching(protocol)
    }

    fn switching(&self, protocol: &'static str) -> Response<Body> {
        let mut r = Response::new(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let hm = r.headers_mut();
        hm.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("Upgrade"),
        );
        match self {
            Upgrade::WebSocket { key, .. } => {
                hm.insert(
                    header::UPGRADE,
                    header::HeaderValue::from_static("websocket"),
                );
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                if let Ok(v) = accept.parse() {
                    hm.insert("sec-websocket-accept", v);
                }
                hm.insert(
                    "sec-websocket-protocol",
                    header::HeaderValue::from_static(protocol),
                );
            }
            Upgrade::Spdy { .. } => {
                hm.insert(
                    header::UPGRADE,
                    header::HeaderValue::from_static("SPDY/3.1"),
                );
                hm.insert(
                    "x-stream-protocol-version",
                    header::HeaderValue::from_static(protocol),
                );
            }
        }
        r
    }
}

/// The standard streams the client asked for.
#[derive(Debug, Clone, Copy)]
struct Want {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

/// What runs once connected.
struct Session {
    state: Arc<State>,
    pod: (String, String),
    command: Vec<String>,
    want: Want,
}

const CHANNEL_PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// `exec` and `attach` (`attach` runs `cat`, the "main process" of a test pod).
pub(super) fn exec(
    state: &Arc<State>,
    mut req: Request<Incoming>,
    pod: (&str, &str),
    attach: bool,
    params: &[(String, String)],
) -> Response<Body> {
    let (ns, name) = pod;
    if let Some(r) = missing_pod(state, ns, name) {
        return r;
    }
    let flag = |k: &str| {
        params
            .iter()
            .any(|(n, v)| n == k && matches!(v.as_str(), "true" | "1"))
    };
    let want = Want {
        stdin: flag("stdin"),
        stdout: flag("stdout"),
        stderr: flag("stderr"),
        tty: flag("tty"),
    };
    let bad = |m: &str| status(StatusCode::BAD_REQUEST, "BadRequest", m);
    if !(want.stdin || want.stdout || want.stderr) {
        return bad("you must specify at least 1 of stdin, stdout, stderr");
    }
    let command: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    if !attach && command.is_empty() {
        return bad("you must specify at least one command for the container");
    }
    let Some(upgrade) = Upgrade::of(&req) else {
        return bad("Upgrade request required");
    };
    let Some(protocol) = upgrade.pick(&CHANNEL_PROTOCOLS) else {
        return bad("unable to upgrade: no supported stream protocol offered (this server speaks v5.channel.k8s.io and v4.channel.k8s.io)");
    };
    let session = Session {
        state: state.clone(),
        pod: (ns.to_string(), name.to_string()),
        command: if attach { vec!["cat".into()] } else { command },
        want,
    };
    upgrade.accept(&mut req, state, protocol, move |io, websocket| async move {
        if websocket {
            session
                .websocket(io, protocol == CHANNEL_PROTOCOLS[0])
                .await;
        } else {
            session.spdy(io).await;
        }
    })
}

/// The final status of a process, as the kubelet reports it.
fn exit_status(command: &[String], code: i32) -> Vec<u8> {
    let v = if code == 0 {
        serde_json::json!({"metadata": {}, "status": "Success"})
    } else {
        serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        })
    };
    v.to_string().into_bytes()
}

impl Session {
    /// Starts the process; its output arrives on the returned receivers.
    fn start(
        self,
        stdin: mpsc::Receiver<Bytes>,
    ) -> (
        tokio::task::JoinHandle<i32>,
        mpsc::Receiver<Bytes>,
        mpsc::Receiver<Bytes>,
    ) {
        let (stdout, out_rx) = mpsc::channel(16);
        let (stderr, err_rx) = mpsc::channel(16);
        let proc = tokio::spawn(async move {
            let io = Stdio {
                stdin,
                stdout,
                stderr,
            };
            process::run(&self.state.files, self.pod, &self.command, io).await
        });
        (proc, out_rx, err_rx)
    }

    async fn websocket<I>(self, io: I, v5: bool)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        let (mut sink, mut incoming) = ws.split();
        let want = self.want;
        let command = self.command.clone();
        let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
        // Reads stdin apart from the output loop, so a process that is slow to read
        // stdin never stops its own output.
        let reader = tokio::spawn(async move {
            let mut stdin = want.stdin.then_some(stdin_tx);
            while let Some(Ok(msg)) = incoming.next().await {
                let Message::Binary(b) = msg else {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                    continue;
                };
                match (b.first(), b.get(1)) {
                    (Some(0), _) => {
                        if let Some(tx) = &stdin {
                            if tx.send(Bytes::copy_from_slice(&b[1..])).await.is_err() {
                                stdin = None;
                            }
                        }
                    }
                    (Some(255), Some(0)) if v5 => stdin = None,
                    _ => {}
                }
            }
        });
        let (proc, mut out_rx, mut err_rx) = self.start(stdin_rx);
        let frame = |ch: u8, data: &[u8]| {
            let mut v = Vec::with_capacity(data.len() + 1);
            v.push(ch);
            v.extend_from_slice(data);
            Message::binary(v)
        };
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            let (ch, data) = tokio::select! {
                m = out_rx.recv(), if out_open => match m {
                    Some(b) => (1, b),
                    None => { out_open = false; continue }
                },
                m = err_rx.recv(), if err_open => match m {
                    // A terminal has no separate stderr.
                    Some(b) => (if want.tty { 1 } else { 2 }, b),
                    None => { err_open = false; continue }
                },
            };
            let wanted = if ch == 1 { want.stdout } else { want.stderr };
            if wanted && sink.send(frame(ch, &data)).await.is_err() {
                reader.abort();
                return;
            }
        }
        let code = proc.await.unwrap_or(1);
        let _ = sink.send(frame(3, &exit_status(&command, code))).await;
        let _ = sink
            .send(Message::Close(Some(
                tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code:
                        tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                    reason: "".into(),
                },
            )))
            .await;
        reader.abort();
    }

    async fn spdy<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let want = self.want;
        let mut incoming = spdy::serve(io);
        let mut expected = vec!["error"];
        if want.stdin {
            expected.push("stdin");
        }
        if want.stdout {
            expected.push("stdout");
        }
        if want.stderr && !want.tty {
            expected.push("stderr");
        }
        if want.tty {
            expected.push("resize");
        }
        let mut streams = std::collections::HashMap::new();
        // The kubelet gives the client this long to open its streams.
        let deadline = tokio::time::sleep(Duration::from_secs(30));
        tokio::pin!(deadline);
        while !expected.iter().all(|k| streams.contains_key(*k)) {
            tokio::select! {
                s = incoming.recv() => match s {
                    Some(s) => {
                        let kind = s.headers.get("streamtype").cloned().unwrap_or_default();
                        streams.insert(kind, s);
                    }
                    None => return,
                },
                _ = &mut deadline => return,
            }
        }
        let Some(error) = streams.remove("error") else {
            return;
        };
        let (stdin, stdin_out) = match streams.remove("stdin") {
            Some(s) => (s.data, Some(s.out)),
            None => (mpsc::channel(1).1, None),
        };
        let command = self.command.clone();
        let (proc, out_rx, err_rx) = self.start(stdin);
        let pump = |stream: Option<spdy::Stream>, mut rx: mpsc::Receiver<Bytes>| {
            tokio::spawn(async move {
                while let Some(b) = rx.recv().await {
                    if let Some(s) = &stream {
                        s.out.send(&b).await;
                    }
                }
                if let Some(s) = stream {
                    s.out.close().await;
                }
            })
        };
        let stderr = streams.remove("stderr");
        let out = pump(streams.remove("stdout"), out_rx);
        let err = pump(stderr, err_rx);
        let code = proc.await.unwrap_or(1);
        let _ = out.await;
        let _ = err.await;
        error.out.send(&exit_status(&command, code)).await;
        error.out.close().await;
        if let Some(s) = stdin_out {
            s.close().await;
        }
        for s in streams.into_values() {
            s.out.close().await;
        }
    }
}
