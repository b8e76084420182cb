//! The CI job credential: `ci:<agent id>:<job token>`.

/// Longest accepted job token; longer input is refused before any lookup.
const MAX_TOKEN_LEN: usize = 512;

/// A parsed CI credential. `Debug` masks the job token.
#[derive(Clone, PartialEq, Eq)]
pub struct CiToken<'a> {
    pub agent_id: u64,
    pub job_token: &'a str,
}

impl std::fmt::Debug for CiToken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CiToken")
            .field("agent_id", &self.agent_id)
            .field("job_token", &"****")
            .finish()
    }
}

/// Why a credential was refused; the text is safe to return to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing credentials: send `Authorization: Bearer ci:<agent id>:<job token>`")]
    Missing,
    #[error(
        "malformed credentials: expected a bearer token of the form ci:<agent id>:<job token>"
    )]
    Malformed,
}

/// Parses the value of an `Authorization` header.
pub fn parse_ci_token(header: Option<&str>) -> Result<CiToken<'_>, TokenError> {
    let h = header.ok_or(TokenError::Missing)?;
    let rest = kas_api::bearer_token(h).ok_or(TokenError::Malformed)?;
    if rest.len() > MAX_TOKEN_LEN + 32 {
        return Err(TokenError::Malformed);
    }
    let rest = rest.strip_prefix("ci:").ok_or(TokenError::Malformed)?;
    let (id, job_token) = rest.split_once(':').ok_or(TokenError::Malformed)?;
    if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TokenError::Malformed);
    }
    let agent_id: u64 = id.parse().map_err(|_| TokenError::Malformed)?;
    if job_token.is_empty()
        || job_token.len() > MAX_TOKEN_LEN
        || !job_token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(TokenError::Malformed);
    }
    Ok(CiToken {
        agent_id,
        job_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let t = parse_ci_token(Some("Bearer ci:7:kasjob-abc")).expect("ok");
        assert_eq!((t.agent_id, t.job_token), (7, "kasjob-abc"));
        assert!(!format!("{t:?}").contains("kasjob"));
        assert_eq!(parse_ci_token(None), Err(TokenError::Missing));
        for bad in [
            "",
            "Bearer",
            "Bearer ",
            "Bearer ci:",
            "Bearer ci:x:y",
            "Bearer ci:7",
            "Bearer ci:7:",
            "Bearer ci::tok",
            "Basic ci:7:tok",
            "Bearer 7:tok",
            "Bearer ci:99999999999999999999999:t",
            "Bearer ci:7:to ken",
        ] {
            assert!(parse_ci_token(Some(bad)).is_err(), "{bad:?} accepted");
        }
        let long = format!("Bearer ci:7:{}", "a".repeat(10_000));
        assert_eq!(parse_ci_token(Some(&long)), Err(TokenError::Malformed));
    }
}
