//! Secrets: generation, hashing, and a wrapper that never prints them.

use rand::distributions::Alphanumeric;
use rand::Rng;
use sha2::{Digest, Sha256};
use std::fmt;

/// A secret shown once to its owner. `Debug` and `Display` are masked.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }
    /// The secret itself, for the one place that must hand it over.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

/// What a token is for; the prefix makes leaked tokens recognizable.
#[derive(Debug, Clone, Copy)]
pub enum TokenKind {
    Agent,
    Job,
    Admin,
}

/// A new random token (238 bits of entropy).
pub fn new_token(kind: TokenKind) -> Secret {
    let prefix = match kind {
        TokenKind::Agent => "kasagent-",
        TokenKind::Job => "kasjob-",
        TokenKind::Admin => "kasadmin-",
    };
    let body: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    Secret(format!("{prefix}{body}"))
}

/// SHA-256 of a token. Tokens are long random strings, so a fast hash is enough: the
/// hash is what is stored and what lookups compare.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_and_distinct() {
        let a = new_token(TokenKind::Agent);
        let b = new_token(TokenKind::Agent);
        assert_ne!(a, b);
        assert!(a.expose().starts_with("kasagent-"));
        assert_eq!(format!("{a:?}"), "Secret(****)");
        assert_ne!(hash_token(a.expose()), hash_token(b.expose()));
    }
}
