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

/// Whether a request header from a client must never reach the cluster: credentials
/// and impersonation are decided by kas and the agent only.
pub fn is_identity_header(name: &str) -> bool {
    name.eq_ignore_ascii_case("authorization")
        || name.len() >= 12 && name[..12].eq_ignore_ascii_case("impersonate-")
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
        out.push(Header {
            name: n.to_string(),
            value: bytes::Bytes::copy_from_slice(value.as_bytes()),
        });
    }
    if upgrade {
        out.push(Header {
            name: "connection".into(),
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
        if strip_identity && is_identity_header(&h.name) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(&h.value),
        ) {
            map.append(n, v);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let names: Vec<&str> = w.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["accept"]);
        let w = to_wire(&m, true, true);
        let mut names: Vec<&str> = w.iter().map(|h| h.name.as_str()).collect();
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
