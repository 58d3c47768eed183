//! Where the agent's JWT comes from: inline in the config, or a file re-read whenever it
//! changes, so an operator (or the session refresher) rotates the token without restarting the
//! agent. The file holds the JWT alone, or a session written by `provision` (JSON with
//! `access_token` and `refresh_token`, see [`super::session`]), whose access token is sent.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::config::Secret;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the JWT file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the JWT file {0} is empty")]
    Empty(PathBuf),
    #[error("the session file {path} is unreadable: {reason}")]
    Session { path: PathBuf, reason: String },
    /// Found before any request: nothing the backend said.
    #[error("the agent's token carries no owner (no readable `sub` claim)")]
    NoOwner,
}

/// The claims of a JWT, read without verifying its signature (the backend verifies it on every
/// request): the agent only looks at its own token's `sub` and `exp`.
pub fn unverified_claims(token: &str) -> Result<serde_json::Value, String> {
    use base64::Engine as _;
    let payload = token
        .split('.')
        .nth(1)
        .ok_or("not a JWT (no payload part)")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("not a JWT (payload is not base64url: {e})"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("not a JWT (payload is not JSON: {e})"))
}

#[derive(Debug, Clone)]
pub enum TokenSource {
    Inline(Secret),
    File {
        path: PathBuf,
        cache: Arc<Mutex<Option<(SystemTime, u64, Secret)>>>,
    },
}

impl TokenSource {
    pub fn file(path: PathBuf) -> TokenSource {
        TokenSource::File {
            path,
            cache: Arc::new(Mutex::new(None)),
        }
    }

    /// The token to send now. A file is stat'ed on every call and read again only when its
    /// modification time or size changed.
    pub fn current(&self) -> Result<String, TokenError> {
        match self {
            TokenSource::Inline(secret) => Ok(secret.expose().to_string()),
            TokenSource::File { path, cache } => {
                let read_err = |source| TokenError::Read {
                    path: path.clone(),
                    source,
                };
                let meta = std::fs::metadata(path).map_err(read_err)?;
                let stamp = (
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                );
                let mut cached = cache.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((modified, len, token)) = cached.as_ref()
                    && (*modified, *len) == stamp
                {
                    return Ok(token.expose().to_string());
                }
                let text = std::fs::read_to_string(path).map_err(read_err)?;
                let text = text.trim();
                let token = if text.starts_with('{') {
                    serde_json::from_str::<super::session::Session>(text)
                        .map_err(|e| TokenError::Session {
                            path: path.clone(),
                            reason: e.to_string(),
                        })?
                        .access_token
                } else {
                    text.to_string()
                };
                if token.is_empty() {
                    return Err(TokenError::Empty(path.clone()));
                }
                *cached = Some((stamp.0, stamp.1, Secret::new(token.clone())));
                Ok(token)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_token_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.jwt");
        std::fs::write(&path, "first.token\n").unwrap();
        let source = TokenSource::file(path.clone());
        assert_eq!(source.current().unwrap(), "first.token");
        std::fs::write(&path, "second.token.longer\n").unwrap();
        assert_eq!(source.current().unwrap(), "second.token.longer");
    }

    #[test]
    fn a_session_file_gives_its_access_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.json");
        std::fs::write(&path, r#"{"access_token":"a.b.c","refresh_token":"r"}"#).unwrap();
        assert_eq!(TokenSource::file(path.clone()).current().unwrap(), "a.b.c");
        std::fs::write(&path, r#"{"access_token":"a.b.c"}"#).unwrap();
        assert!(matches!(
            TokenSource::file(path).current(),
            Err(TokenError::Session { .. })
        ));
    }

    #[test]
    fn a_missing_or_empty_token_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.jwt");
        assert!(matches!(
            TokenSource::file(path.clone()).current(),
            Err(TokenError::Read { .. })
        ));
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(
            TokenSource::file(path).current(),
            Err(TokenError::Empty(_))
        ));
    }
}
