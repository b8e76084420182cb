//! The CI job credential parser (`Authorization: Bearer ci:<agent id>:<job token>`),
//! and the same credential sent as a WebSocket subprotocol.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = kas_k8s_proxy::parse_ci_token(Some(s)) {
            assert!(!t.job_token.is_empty() && t.job_token.len() <= 512);
            assert!(t.job_token.bytes().all(|b| b.is_ascii_graphic()));
            // Debug never shows the job token (short ones may match by chance).
            if t.job_token.len() > 20 {
                assert!(!format!("{t:?}").contains(t.job_token));
            }
        }
    }
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        let mut m = http::HeaderMap::new();
        m.insert(http::header::SEC_WEBSOCKET_PROTOCOL, v);
        if let Some(token) = kas_tunnel::headers::websocket_bearer(&m) {
            let _ = kas_k8s_proxy::parse_ci_token(Some(&format!("Bearer {token}")));
        }
    }
});
