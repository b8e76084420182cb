//! The `service_access` section of an agent's `config.yaml`: which in-cluster HTTP
//! services the application may reach through the agent. Opt-in: an agent without it
//! reaches no service. Each entry is a URL naming the scheme, host, port and a path
//! prefix; a request is allowed only if all four match.
//!
//! ```yaml
//! service_access:
//!   - url: http://prometheus.monitoring.svc:9090/api/v1/
//! ```

use serde::Deserialize;

/// `service_access[]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    pub url: String,
}

/// A parsed `service_access` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedService {
    pub scheme: String,
    /// Lowercase.
    pub host: String,
    pub port: u16,
    /// Starts and ends with '/'.
    pub path_prefix: String,
}

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
    if has_dot_segment(path) {
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
        port,
        path_prefix: prefix,
    })
}

/// `.` or `..` segments, also percent-encoded (`%2e`), or an encoded slash: all could
/// step outside an allowed prefix once the service decodes the path.
fn has_dot_segment(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains('\\') {
        return true;
    }
    lower
        .split('/')
        .map(|s| s.replace("%2e", "."))
        .any(|s| s == "." || s == "..")
}

impl AllowedService {
    /// Whether a request for `path` (path only, no query) on the service is allowed.
    pub fn allows(&self, scheme: &str, host: &str, port: u16, path: &str) -> bool {
        if !scheme.eq_ignore_ascii_case(&self.scheme)
            || !host.eq_ignore_ascii_case(&self.host)
            || port != self.port
            || has_dot_segment(path)
        {
            return false;
        }
        let with_slash = format!("{}/", path.trim_end_matches('/'));
        path.starts_with(&self.path_prefix) || with_slash == self.path_prefix
    }

    /// The entry as a URL, for messages.
    pub fn url(&self) -> String {
        format!(
            "{}://{}:{}{}",
            self.scheme, self.host, self.port, self.path_prefix
        )
    }
}

/// Whether any entry allows the request.
pub fn service_allowed(
    list: &[AllowedService],
    scheme: &str,
    host: &str,
    port: u16,
    path: &str,
) -> bool {
    list.iter().any(|s| s.allows(scheme, host, port, path))
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

    #[test]
    fn requests_must_match_scheme_host_port_and_prefix() {
        let list = [parse_service_url("http://prom.mon:9090/api/v1/").expect("ok")];
        let ok = |s, h, p, path| service_allowed(&list, s, h, p, path);
        assert!(ok("http", "prom.mon", 9090, "/api/v1/query"));
        assert!(ok("http", "PROM.mon", 9090, "/api/v1"));
        assert!(!ok("https", "prom.mon", 9090, "/api/v1/query"));
        assert!(!ok("http", "prom.mon", 9091, "/api/v1/query"));
        assert!(!ok("http", "other", 9090, "/api/v1/query"));
        assert!(!ok("http", "prom.mon", 9090, "/api/v2/query"));
        assert!(!ok("http", "prom.mon", 9090, "/api/v1x"));
        assert!(!ok("http", "prom.mon", 9090, "/api/v1/../../admin"));
        assert!(!ok("http", "prom.mon", 9090, "/api/v1/%2e%2e/admin"));
        assert!(!ok("http", "prom.mon", 9090, "/api/v1%2f..%2fadmin"));
        assert!(!service_allowed(&[], "http", "prom.mon", 9090, "/api/v1/"));
    }
}
