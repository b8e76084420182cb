//! Header filtering shared by kas and agentk.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use kas_proto::v1::Header;

/// Hop-by-hop headers (RFC 9110 7.6.1) that a proxy never forwards.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// The WebSocket subprotocol prefix under which browsers and some clients send a
/// bearer token (`base64url.bearer.authorization.k8s.io.<base64url token>`), since
/// WebSocket APIs cannot set `Authorization`.
pub const WEBSOCKET_BEARER_PREFIX: &str = "base64url.bearer.authorization.k8s.io.";

/// A `Sec-WebSocket-Protocol` value without its bearer token entries (the other
/// subprotocols kept, byte for byte, in order); `None` when nothing else is left.
pub fn strip_websocket_bearer(value: &[u8]) -> Option<Vec<u8>> {
    let kept: Vec<&[u8]> = value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty() && !p.starts_with(WEBSOCKET_BEARER_PREFIX.as_bytes()))
        .collect();
    (!kept.is_empty()).then(|| kept.join(&b", "[..]))
}

/// The bearer token a WebSocket client put in `Sec-WebSocket-Protocol`, if any.
pub fn websocket_bearer(map: &HeaderMap) -> Option<String> {
    use base64::Engine;
    map.get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(WEBSOCKET_BEARER_PREFIX))
        .and_then(|b| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b.trim_end_matches('='))
                .ok()
        })
        .and_then(|t| String::from_utf8(t).ok())
}

/// Whether a request header from a client must never reach the cluster: credentials
/// and impersonation are decided by kas and the agent only.
pub fn is_identity_header(name: &str) -> bool {
    is_identity_name(name.as_bytes())
}

fn is_identity_name(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"authorization")
        || name.len() >= 12 && name[..12].eq_ignore_ascii_case(b"impersonate-")
}

/// A header's name for the wire: the names most requests and responses carry are
/// static, so they cost no allocation per request.
fn wire_name(n: &str) -> bytes::Bytes {
    const COMMON: [&str; 12] = [
        "accept",
        "accept-encoding",
        "audit-id",
        "cache-control",
        "content-length",
        "content-type",
        "date",
        "kubectl-command",
        "kubectl-session",
        "user-agent",
        "x-kubernetes-pf-flowschema-uid",
        "x-kubernetes-pf-prioritylevel-uid",
    ];
    match COMMON.iter().find(|c| **c == n) {
        Some(c) => bytes::Bytes::from_static(c.as_bytes()),
        None => bytes::Bytes::copy_from_slice(n.as_bytes()),
    }
}

/// Converts headers for the wire, dropping hop-by-hop headers (and those named in
/// `Connection`), `Host`, and, when `strip_identity`, credentials and impersonation.
/// `Upgrade` and `Connection: upgrade` survive when `upgrade` is set.
pub fn to_wire(map: &HeaderMap, strip_identity: bool, upgrade: bool) -> Vec<Header> {
    let named_in_connection: Vec<String> = map
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| s != "upgrade")
        .collect();
    let mut out = Vec::with_capacity(map.len());
    for (name, value) in map {
        let n = name.as_str();
        if n == "host"
            || HOP_BY_HOP.contains(&n)
            || (n == "upgrade" && !upgrade)
            || named_in_connection.iter().any(|c| c == n)
            || (strip_identity && is_identity_header(n))
        {
            continue;
        }
        if strip_identity && n == "sec-websocket-protocol" {
            if let Some(v) = strip_websocket_bearer(value.as_bytes()) {
                out.push(Header {
                    name: wire_name(n),
                    value: v.into(),
                });
            }
            continue;
        }
        out.push(Header {
            name: wire_name(n),
            value: bytes::Bytes::copy_from_slice(value.as_bytes()),
        });
    }
    if upgrade {
        out.push(Header {
            name: bytes::Bytes::from_static(b"connection"),
            value: bytes::Bytes::from_static(b"Upgrade"),
        });
    }
    out
}

/// Rebuilds a header map from the wire, dropping anything invalid and, when
/// `strip_identity`, credentials and impersonation (defence in depth).
pub fn from_wire(headers: &[Header], strip_identity: bool) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len());
    for h in headers {
        if strip_identity && is_identity_name(&h.name) {
            continue;
        }
        let value = if strip_identity && h.name.eq_ignore_ascii_case(b"sec-websocket-protocol") {
            match strip_websocket_bearer(&h.value) {
                Some(v) => HeaderValue::from_bytes(&v),
                None => continue,
            }
        } else {
            // Shares the decoded message's buffer instead of copying the value.
            HeaderValue::from_maybe_shared(h.value.clone())
        };
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(&h.name), value) {
            map.append(n, v);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_str(h: &Header) -> &str {
        std::str::from_utf8(&h.name).expect("ASCII name")
    }

    #[test]
    fn websocket_bearer_tokens_are_read_and_stripped() {
        use base64::Engine;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("ci:7:secret");
        let value =
            format!("v5.channel.k8s.io, {WEBSOCKET_BEARER_PREFIX}{token},v4.channel.k8s.io");
        let mut m = HeaderMap::new();
        m.insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&value).expect("value"),
        );
        assert_eq!(websocket_bearer(&m).as_deref(), Some("ci:7:secret"));
        let w = to_wire(&m, true, true);
        let p = w
            .iter()
            .find(|h| h.name == "sec-websocket-protocol")
            .expect("kept");
        assert_eq!(&p.value[..], b"v5.channel.k8s.io, v4.channel.k8s.io");
        // Only the token: the header goes.
        let only = format!("{WEBSOCKET_BEARER_PREFIX}{token}");
        m.insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(&only).expect("value"),
        );
        assert!(to_wire(&m, true, true)
            .iter()
            .all(|h| h.name != "sec-websocket-protocol"));
        // The agent side strips it too (defence in depth).
        let back = from_wire(
            &[Header {
                name: "Sec-WebSocket-Protocol".into(),
                value: value.clone().into(),
            }],
            true,
        );
        assert_eq!(
            back["sec-websocket-protocol"],
            "v5.channel.k8s.io, v4.channel.k8s.io"
        );
        assert_eq!(strip_websocket_bearer(b" , "), None);
    }

    #[test]
    fn strips_identity_and_hop_by_hop() {
        let mut m = HeaderMap::new();
        m.insert("authorization", HeaderValue::from_static("Bearer x"));
        m.insert("impersonate-user", HeaderValue::from_static("admin"));
        m.insert("Impersonate-Extra-foo", HeaderValue::from_static("bar"));
        m.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        m.insert("x-private", HeaderValue::from_static("1"));
        m.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        m.insert("host", HeaderValue::from_static("kas"));
        m.insert("accept", HeaderValue::from_static("application/json"));
        m.insert("upgrade", HeaderValue::from_static("websocket"));
        let w = to_wire(&m, true, false);
        let names: Vec<&str> = w.iter().map(name_str).collect();
        assert_eq!(names, ["accept"]);
        let w = to_wire(&m, true, true);
        let mut names: Vec<&str> = w.iter().map(name_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "connection", "upgrade"]);
        let back = from_wire(
            &[
                Header {
                    name: "Impersonate-Group".into(),
                    value: "x".into(),
                },
                Header {
                    name: "bad name".into(),
                    value: "x".into(),
                },
                Header {
                    name: "accept".into(),
                    value: "a".into(),
                },
            ],
            true,
        );
        assert_eq!(back.len(), 1);
    }
}
