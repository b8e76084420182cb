//! The proxy's request path handling: a client's method, target and headers turned
//! into the head sent to the agent. Whatever the client sends, the head has a path
//! starting with `/`, no credentials, no impersonation, no hop-by-hop headers and no
//! bearer token in a WebSocket subprotocol, and the agent's rebuilt headers neither.
#![no_main]

use bytes::Bytes;
use http_body_util::Empty;
use kas_tunnel::headers::{is_identity_header, WEBSOCKET_BEARER_PREFIX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let (Some(method), Some(target)) = (lines.next(), lines.next()) else {
        return;
    };
    let mut b = http::Request::builder()
        .method(method.trim())
        .uri(target.trim());
    for l in lines {
        if let Some((n, v)) = l.split_once(':') {
            b = b.header(n.trim(), v.trim());
        }
    }
    let Ok(req) = b.body(Empty::<Bytes>::new()) else {
        return;
    };
    let head = kas_k8s_proxy::upstream_head(&req, None, "fuzz");
    assert!(
        head.path_and_query.starts_with('/'),
        "{:?}",
        head.path_and_query
    );
    assert!(head.impersonation.is_none());
    for h in &head.headers {
        let Ok(n) = std::str::from_utf8(&h.name) else {
            panic!("a header name that is not ASCII: {:?}", h.name);
        };
        assert!(!is_identity_header(n), "{n}");
        assert!(
            !matches!(
                n,
                "host" | "transfer-encoding" | "te" | "keep-alive" | "proxy-authorization"
            ),
            "{n}"
        );
        if n == "sec-websocket-protocol" {
            // No subprotocol entry is a bearer token.
            for p in h.value.split(|b| *b == b',') {
                assert!(!p
                    .trim_ascii()
                    .starts_with(WEBSOCKET_BEARER_PREFIX.as_bytes()));
            }
        }
    }
    let _ = kas_k8s_proxy::audit::verb(&head.method, &head.path_and_query);
    let back = kas_tunnel::headers::from_wire(&head.headers, true);
    assert!(back.keys().all(|k| !is_identity_header(k.as_str())));
});
