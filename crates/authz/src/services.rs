//! The `service_access` section of an agent's `config.yaml`: which in-cluster HTTP
//! services the application may reach through the agent. Opt-in: an agent without it
//! reaches no service. Each entry is a URL naming the scheme, host, port and a path
//! prefix; a request is allowed only if all four match.
//!
//! ```yaml
//! service_access:
//!   - url: http://prometheus.monitoring.svc:9090/api/v1/
//! ```

use kas_proto::service_path_escapes;
use serde::Deserialize;

/// `service_access[]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    pub url: String,
}

/// A parsed `service_access` entry, as kas sends it to agentk (which enforces it).
pub type AllowedService = kas_proto::v1::ServiceAccess;

/// Parses `http(s)://host[:port][/prefix]`; no credentials, query or fragment.
pub fn parse_service_url(url: &str) -> Result<AllowedService, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` is not a URL (use http://host:port/path/)"))?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => {
            return Err(format!(
                "`{url}`: only http and https services can be reached"
            ))
        }
    };
    if rest.contains(['?', '#', '@']) {
        return Err(format!(
            "`{url}`: no credentials, query or fragment allowed; give host, port and path prefix"
        ));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("`{url}`: `{p}` is not a port"))?,
        ),
        _ => (authority, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
    {
        return Err(format!("`{url}`: `{host}` is not a host name"));
    }
    if port == 0 {
        return Err(format!("`{url}`: port 0 is not a port"));
    }
    if service_path_escapes(path) {
        return Err(format!(
            "`{url}`: the path must not contain `.` or `..` segments"
        ));
    }
    let mut prefix = path.to_string();
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    Ok(AllowedService {
        scheme,
        host: host.to_ascii_lowercase(),
        port: u32::from(port),
        path_prefix: prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults() {
        let s = parse_service_url("http://Prometheus.monitoring.svc:9090/api/v1").expect("ok");
        assert_eq!(
            (
                s.scheme.as_str(),
                s.host.as_str(),
                s.port,
                s.path_prefix.as_str()
            ),
            ("http", "prometheus.monitoring.svc", 9090, "/api/v1/")
        );
        assert_eq!(parse_service_url("https://svc").expect("ok").port, 443);
        assert_eq!(
            parse_service_url("http://svc").expect("ok").path_prefix,
            "/"
        );
        for bad in [
            "svc:80",
            "ftp://svc/",
            "http://user:pw@svc/",
            "http://svc/?q=1",
            "http://svc:x/",
            "http://svc:0/",
            "http://svc/a/../b",
            "http:///a",
        ] {
            assert!(parse_service_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn bad_entries_are_refused_naming_the_field() {
        let err = crate::parse_agent_config("service_access:\n  - url: ftp://x/\n", "a/b")
            .expect_err("refused");
        assert!(err.to_string().contains("service_access[0].url"), "{err}");
        let (c, _) =
            crate::parse_agent_config("service_access:\n  - url: http://prom:9090/api/\n", "a/b")
                .expect("valid");
        assert_eq!(c.allowed_services()[0].port, 9090);
    }
}
