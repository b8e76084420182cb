//! `environments` patterns: literal names where `*` matches any run of characters
//! (including `/`), so `review/*` matches `review/feature-1`.

/// Whether the environment name matches the pattern.
pub fn environment_matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    // Greedy left-to-right matching of the middle parts is correct for `*`-only globs.
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::environment_matches as m;

    #[test]
    fn literal_and_wildcards() {
        assert!(m("production", "production"));
        assert!(!m("production", "production2"));
        assert!(m("review/*", "review/feature-1"));
        assert!(m("review/*", "review/a/b"));
        assert!(m("review/*", "review/"));
        assert!(!m("review/*", "review"));
        assert!(!m("review/*", "staging"));
        assert!(m("*", "anything"));
        assert!(m("*-prod", "eu-prod"));
        assert!(!m("*-prod", "eu-production"));
        assert!(m("a*b*c", "a-x-b-y-c"));
        assert!(!m("a*b*c", "a-x-c-y-b"));
        assert!(!m("ab*ba", "aba"));
    }
}
