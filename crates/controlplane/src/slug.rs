//! Environment slugs and tiers, following GitLab's rules so identities match.

use sha2::{Digest, Sha256};

/// The deployment tiers an environment may have.
pub const TIERS: [&str; 5] = ["production", "staging", "testing", "development", "other"];

/// GitLab's environment slug: lowercase letters, digits and '-', starting with a letter,
/// at most 24 characters; when the name had to change, a 6-character suffix derived
/// from the name keeps slugs distinct.
pub fn environment_slug(name: &str) -> String {
    let mut s: String = name
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        s = format!("env-{s}");
    }
    let mut squeezed = String::with_capacity(s.len());
    for c in s.chars() {
        if !(c == '-' && squeezed.ends_with('-')) {
            squeezed.push(c);
        }
    }
    if squeezed.len() > 24 || squeezed != name {
        let mut short: String = squeezed.chars().take(17).collect();
        if !short.ends_with('-') {
            short.push('-');
        }
        short.push_str(&suffix(name));
        short
    } else {
        squeezed.trim_end_matches('-').to_string()
    }
}

/// Last 6 base-36 digits of the SHA-256 of the name read as a big-endian integer.
fn suffix(name: &str) -> String {
    const M: u64 = 36u64.pow(6);
    let mut r = 0u64;
    for b in Sha256::digest(name.as_bytes()) {
        r = (r * 256 + u64::from(b)) % M;
    }
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = digits[(r % 36) as usize];
        r /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// GitLab's guess of a tier from an environment name, used when none is given.
pub fn guess_tier(name: &str) -> &'static str {
    let n = name.to_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| n.contains(w));
    if has(&["dev", "review", "trunk"]) {
        "development"
    } else if has(&[
        "test", "tst", "int", "acpt", "accept", "qa", "qc", "control", "quality",
    ]) {
        "testing"
    } else if has(&["stag", "stg", "model", "mod", "pre", "demo", "non"]) {
        "staging"
    } else if has(&["prod", "prd", "live"]) {
        "production"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert_eq!(environment_slug("prod"), "prod");
        assert_eq!(environment_slug("production"), "production");
        let s = environment_slug("review/feature-1");
        assert!(s.starts_with("review-feature-1-"), "{s}");
        assert_eq!(s.len(), "review-feature-1-".len() + 6);
        assert_ne!(environment_slug("review/a"), environment_slug("review-a-x"));
        let s = environment_slug("1st");
        assert!(s.starts_with("env-1st-"), "{s}");
        let long = environment_slug("a-very-long-environment-name-indeed");
        assert!(long.len() <= 24, "{long}");
        assert_eq!(environment_slug("Prod"), environment_slug("Prod"));
        assert!(environment_slug("Prod").starts_with("prod-"));
    }

    #[test]
    fn tiers() {
        assert_eq!(guess_tier("production"), "production");
        assert_eq!(guess_tier("prod"), "production");
        assert_eq!(guess_tier("staging"), "staging");
        assert_eq!(guess_tier("review/x"), "development");
        assert_eq!(guess_tier("qa"), "testing");
        assert_eq!(guess_tier("sandbox"), "other");
    }
}
