//! Authentication of the private kas-to-kas API: short-lived HS256 JWTs signed with a
//! secret only the kas replicas share. Each kas signs its own tokens and accepts any
//! replica's.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use kas_api::clock::unix_secs;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::Duration;

const ISSUER: &str = "kas";
const AUDIENCE: &str = "kas-private-api";
/// Lifetime of a token this kas signs; renewed well before it ends.
const LIFETIME: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: String,
    iat: u64,
    exp: u64,
    /// Not before (unix seconds); refused while in the future, beyond the leeway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
}

/// Why a shared secret is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the private API secret must be at least 32 bytes (it is {0})")]
    TooShort(usize),
}

/// Signs and verifies private API tokens. The secret never appears in `Debug`.
pub struct PrivateAuth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    kas_id: String,
    current: Mutex<Option<(String, u64)>>,
}

impl std::fmt::Debug for PrivateAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateAuth")
            .field("kas_id", &self.kas_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl PrivateAuth {
    pub fn new(secret: &[u8], kas_id: &str) -> Result<Self, SecretError> {
        if secret.len() < 32 {
            return Err(SecretError::TooShort(secret.len()));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        validation.leeway = 5;
        validation.validate_nbf = true;
        Ok(PrivateAuth {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            kas_id: kas_id.to_string(),
            current: Mutex::new(None),
        })
    }

    /// A token for calls to other replicas (cached while comfortably valid).
    pub fn token(&self) -> String {
        let t = unix_secs();
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((tok, exp)) = cur.as_ref() {
            if *exp > t + LIFETIME.as_secs() / 2 {
                return tok.clone();
            }
        }
        let claims = Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: self.kas_id.clone(),
            iat: t,
            exp: t + LIFETIME.as_secs(),
            nbf: None,
        };
        // HS256 over serializable claims cannot fail; an empty token is refused by peers.
        let tok = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default();
        *cur = Some((tok.clone(), claims.exp));
        tok
    }

    /// Checks an `Authorization` header value (`Bearer <jwt>`); returns the calling
    /// kas's id.
    pub fn verify(&self, authorization: Option<&str>) -> Result<String, String> {
        let tok = authorization
            .and_then(kas_api::bearer_token)
            .ok_or("missing bearer token")?;
        jsonwebtoken::decode::<Claims>(tok.trim(), &self.decoding, &self.validation)
            .map(|d| d.claims.sub)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_the_same_secret() {
        let a = PrivateAuth::new(&[7u8; 32], "kas-a").expect("a");
        let b = PrivateAuth::new(&[7u8; 32], "kas-b").expect("b");
        let other = PrivateAuth::new(&[8u8; 32], "kas-x").expect("x");
        let t = a.token();
        assert_eq!(b.verify(Some(&format!("Bearer {t}"))), Ok("kas-a".into()));
        assert!(other.verify(Some(&format!("Bearer {t}"))).is_err());
        assert!(b.verify(None).is_err());
        assert!(b.verify(Some(&t)).is_err());
        assert!(b.verify(Some("Bearer not.a.jwt")).is_err());
        assert!(PrivateAuth::new(b"short", "k").is_err());
    }

    #[test]
    fn tokens_not_yet_valid_are_refused() {
        let key = [9u8; 32];
        let v = PrivateAuth::new(&key, "kas-b").expect("v");
        let sign = |nbf: u64| {
            let c = Claims {
                iss: ISSUER.into(),
                aud: AUDIENCE.into(),
                sub: "kas-a".into(),
                iat: unix_secs(),
                exp: unix_secs() + 600,
                nbf: Some(nbf),
            };
            let t = jsonwebtoken::encode(&Header::default(), &c, &EncodingKey::from_secret(&key))
                .expect("sign");
            format!("Bearer {t}")
        };
        assert!(
            v.verify(Some(&sign(unix_secs() + 300))).is_err(),
            "future nbf"
        );
        assert!(
            v.verify(Some(&sign(unix_secs() + 2))).is_ok(),
            "within the leeway"
        );
        assert!(v.verify(Some(&sign(unix_secs() - 10))).is_ok());
    }

    #[test]
    fn expired_and_foreign_audience_tokens_are_refused() {
        let key = [9u8; 32];
        let v = PrivateAuth::new(&key, "kas-b").expect("v");
        let sign = |aud: &str, exp: u64| {
            let c = Claims {
                iss: ISSUER.into(),
                aud: aud.into(),
                sub: "kas-a".into(),
                iat: 0,
                exp,
                nbf: None,
            };
            jsonwebtoken::encode(&Header::default(), &c, &EncodingKey::from_secret(&key))
                .expect("sign")
        };
        assert!(v
            .verify(Some(&format!(
                "Bearer {}",
                sign(AUDIENCE, unix_secs() + 60)
            )))
            .is_ok());
        assert!(v
            .verify(Some(&format!(
                "Bearer {}",
                sign(AUDIENCE, unix_secs() - 600)
            )))
            .is_err());
        assert!(v
            .verify(Some(&format!("Bearer {}", sign("other", unix_secs() + 60))))
            .is_err());
    }
}
