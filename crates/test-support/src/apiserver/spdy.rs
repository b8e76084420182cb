//! A SPDY/3.1 server session, as kubectl's `exec`, `attach`, `cp` and `port-forward`
//! speak it after an `Upgrade: SPDY/3.1` (directly, or tunneled in WebSocket messages):
//! the client opens streams (SYN_STREAM with zlib-compressed headers), the server
//! answers each (SYN_REPLY), and both send DATA with FIN to half-close. PINGs are
//! answered; flow control is not enforced (kubectl's SPDY library does not use it).
//!
//! Only what the test API server needs: no server-initiated streams, no priorities.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use std::collections::HashMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The header dictionary of SPDY/3 (section 2.6.10.1): these names, each with a 4-byte
/// big-endian length, then [`DICTIONARY_TAIL`]; 1423 bytes in all.
const DICTIONARY_WORDS: [&str; 65] = [
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

const DICTIONARY_TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";

fn dictionary() -> Vec<u8> {
    let mut d = Vec::with_capacity(1423);
    for w in DICTIONARY_WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(DICTIONARY_TAIL.as_bytes());
    d
}

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;
/// Largest DATA payload sent at once.
const MAX_DATA: usize = 32 * 1024;

/// Headers of a stream, names lowercase.
pub type Headers = HashMap<String, String>;

/// A stream the client opened.
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    /// What the client sends on it; ends at its FIN (or the session's end).
    pub data: mpsc::Receiver<Bytes>,
    /// Sends on it.
    pub out: Sender,
}

/// Writes DATA on one stream.
#[derive(Clone)]
pub struct Sender {
    id: u32,
    frames: mpsc::Sender<Out>,
}

impl Sender {
    /// Sends bytes; false once the session is gone.
    pub async fn send(&self, data: &[u8]) -> bool {
        for chunk in data.chunks(MAX_DATA) {
            let frame = data_frame(self.id, 0, chunk);
            if self.frames.send(Out::Frame(frame)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Half-closes the stream (DATA with FIN).
    pub async fn close(&self) {
        let _ = self
            .frames
            .send(Out::Frame(data_frame(self.id, FLAG_FIN, &[])))
            .await;
    }
}

/// What the writer task sends: a ready frame, or a SYN_REPLY to compress.
enum Out {
    Frame(Bytes),
    Reply(u32),
}

fn data_frame(id: u32, flags: u8, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + data.len());
    b.put_u32(id & 0x7fff_ffff);
    b.put_u32(((flags as u32) << 24) | data.len() as u32);
    b.extend_from_slice(data);
    b.freeze()
}

fn control_frame(kind: u16, flags: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + body.len());
    b.put_u16(0x8000 | 3);
    b.put_u16(kind);
    b.put_u32(((flags as u32) << 24) | body.len() as u32);
    b.extend_from_slice(body);
    b.freeze()
}

/// Why a session ended early.
#[derive(Debug)]
pub struct ProtocolError(pub String);

/// Serves a session on `io`; the streams the client opens arrive on the returned
/// receiver (each already answered with a SYN_REPLY). The session ends when the client
/// goes away or sends GOAWAY.
pub fn serve<I>(io: I) -> mpsc::Receiver<Stream>
where
    I: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let (streams_tx, streams) = mpsc::channel(16);
    let (frames_tx, mut frames_rx) = mpsc::channel::<Out>(64);
    // Writer: compresses reply headers in order, with its own zlib stream.
    tokio::spawn(async move {
        let mut z = Compress::new(Compression::default(), true);
        if z.set_dictionary(&dictionary()).is_err() {
            return;
        }
        while let Some(out) = frames_rx.recv().await {
            let frame = match out {
                Out::Frame(f) => f,
                Out::Reply(id) => {
                    // An empty header block: zero pairs.
                    let mut raw = Vec::new();
                    raw.extend_from_slice(&0u32.to_be_bytes());
                    let mut compressed = Vec::with_capacity(64);
                    if z.compress_vec(&raw, &mut compressed, FlushCompress::Sync)
                        .is_err()
                    {
                        return;
                    }
                    let mut body = Vec::with_capacity(4 + compressed.len());
                    body.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
                    body.extend_from_slice(&compressed);
                    control_frame(SYN_REPLY, 0, &body)
                }
            };
            if wr.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    tokio::spawn(async move {
        let _ = read_loop(&mut rd, frames_tx, streams_tx).await;
    });
    streams
}

async fn read_loop<R: AsyncRead + Unpin>(
    rd: &mut R,
    frames: mpsc::Sender<Out>,
    streams: mpsc::Sender<Stream>,
) -> Result<(), ProtocolError> {
    let err = |m: String| ProtocolError(m);
    let mut inflate = Decompress::new(true);
    let dict = dictionary();
    let mut open: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    loop {
        let mut head = [0u8; 8];
        if rd.read_exact(&mut head).await.is_err() {
            return Ok(());
        }
        let flags = head[4];
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let mut body = vec![0u8; len];
        rd.read_exact(&mut body)
            .await
            .map_err(|e| err(e.to_string()))?;
        if head[0] & 0x80 == 0 {
            // DATA
            let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
            if let Some(tx) = open.get(&id) {
                if !body.is_empty() {
                    let _ = tx.send(Bytes::from(body)).await;
                }
            }
            if flags & FLAG_FIN != 0 {
                open.remove(&id);
            }
            continue;
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let mut b = &body[..];
        match kind {
            SYN_STREAM => {
                if b.len() < 10 {
                    return Err(err("short SYN_STREAM".into()));
                }
                let id = b.get_u32() & 0x7fff_ffff;
                b.advance(6); // associated stream id, priority, slot
                let headers = decode_headers(&mut inflate, &dict, b)?;
                let (tx, data) = mpsc::channel(64);
                if flags & FLAG_FIN == 0 {
                    open.insert(id, tx);
                }
                let _ = frames.send(Out::Reply(id)).await;
                let s = Stream {
                    id,
                    headers,
                    data,
                    out: Sender {
                        id,
                        frames: frames.clone(),
                    },
                };
                if streams.send(s).await.is_err() {
                    return Ok(());
                }
            }
            RST_STREAM if b.len() >= 4 => {
                open.remove(&(b.get_u32() & 0x7fff_ffff));
            }
            PING => {
                let _ = frames.send(Out::Frame(control_frame(PING, 0, &body))).await;
            }
            GOAWAY => return Ok(()),
            // SETTINGS, WINDOW_UPDATE, HEADERS: nothing to do here.
            _ => {}
        }
    }
}

/// Inflates and parses a header block (the session's zlib stream continues across
/// frames; the dictionary is set when zlib asks for it).
fn decode_headers(
    z: &mut Decompress,
    dict: &[u8],
    mut input: &[u8],
) -> Result<Headers, ProtocolError> {
    let err = |m: &str| ProtocolError(format!("header block: {m}"));
    let mut raw: Vec<u8> = Vec::with_capacity(256);
    loop {
        if raw.capacity() - raw.len() < 256 {
            raw.reserve(4096);
        }
        let (in0, out0) = (z.total_in(), z.total_out());
        let mut progressed = false;
        match z.decompress_vec(input, &mut raw, FlushDecompress::Sync) {
            Ok(_) => {}
            Err(e) if e.needs_dictionary().is_some() => {
                z.set_dictionary(dict).map_err(|_| err("dictionary"))?;
                progressed = true;
            }
            Err(_) => return Err(err("cannot inflate")),
        }
        let used = (z.total_in() - in0) as usize;
        input = &input[used..];
        progressed |= used > 0 || z.total_out() > out0;
        if input.is_empty() && raw.capacity() > raw.len() {
            break;
        }
        if !progressed {
            return Err(err("stuck"));
        }
    }
    let mut b = &raw[..];
    let read_str = |b: &mut &[u8]| -> Result<String, ProtocolError> {
        if b.len() < 4 {
            return Err(err("truncated"));
        }
        let n = b.get_u32() as usize;
        if b.len() < n {
            return Err(err("truncated"));
        }
        let s = String::from_utf8_lossy(&b[..n]).into_owned();
        b.advance(n);
        Ok(s)
    };
    if b.len() < 4 {
        return Err(err("truncated"));
    }
    let pairs = b.get_u32();
    let mut out = Headers::new();
    for _ in 0..pairs {
        let name = read_str(&mut b)?.to_ascii_lowercase();
        let value = read_str(&mut b)?;
        // Several values are NUL-separated; the first is enough here.
        let value = value.split('\0').next().unwrap_or_default().to_string();
        out.insert(name, value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_the_specs() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert!(d.starts_with(b"\x00\x00\x00\x07options\x00\x00\x00\x04head"));
        assert!(d.ends_with(b"enq=0."));
    }

    /// A client's header block, compressed as a client would (its own zlib stream).
    fn client_block(z: &mut Compress, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.put_u32(headers.len() as u32);
        for (k, v) in headers {
            raw.put_u32(k.len() as u32);
            raw.extend_from_slice(k.as_bytes());
            raw.put_u32(v.len() as u32);
            raw.extend_from_slice(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        z.compress_vec(&raw, &mut out, FlushCompress::Sync)
            .expect("compress");
        out
    }

    #[tokio::test]
    async fn streams_open_carry_data_and_close() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let mut streams = serve(server);
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(&dictionary()).expect("dictionary");
        for (id, kind) in [(1u32, "error"), (3, "stdin")] {
            let mut body = Vec::new();
            body.put_u32(id);
            body.put_u32(0);
            body.put_u16(0);
            body.extend_from_slice(&client_block(
                &mut z,
                &[("streamType", kind), ("port", "80")],
            ));
            wr.write_all(&control_frame(SYN_STREAM, 0, &body))
                .await
                .expect("write");
        }
        wr.write_all(&data_frame(3, FLAG_FIN, b"hello"))
            .await
            .expect("write");
        wr.write_all(&control_frame(PING, 0, &7u32.to_be_bytes()))
            .await
            .expect("write");
        let first = streams.recv().await.expect("stream");
        assert_eq!(
            (first.id, first.headers["streamtype"].as_str()),
            (1, "error")
        );
        let mut second = streams.recv().await.expect("stream");
        assert_eq!(second.headers["port"], "80");
        assert_eq!(second.data.recv().await.as_deref(), Some(&b"hello"[..]));
        assert!(second.data.recv().await.is_none(), "FIN ends the stream");
        second.out.send(b"world").await;
        second.out.close().await;
        // Two replies, the ping, the data, the FIN.
        let mut kinds = Vec::new();
        for _ in 0..5 {
            let mut head = [0u8; 8];
            rd.read_exact(&mut head).await.expect("frame");
            let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
            let mut body = vec![0u8; len];
            rd.read_exact(&mut body).await.expect("body");
            kinds.push(if head[0] & 0x80 != 0 {
                format!("control {}", u16::from_be_bytes([head[2], head[3]]))
            } else {
                format!("data {} {}", String::from_utf8_lossy(&body), head[4])
            });
        }
        assert_eq!(
            kinds,
            [
                "control 2",
                "control 2",
                "control 6",
                "data world 0",
                "data  1"
            ]
        );
    }
}
