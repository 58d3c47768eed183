//! The agent's Supabase Auth session (docs/decisions/0016-provisioning-and-claim.md): an access
//! token and a refresh token in one file (`cloud.jwt_file`, mode 0600), written by `provision`
//! and replaced atomically by the refresher before the access token expires, through Supabase
//! Auth's `POST {auth_url}/token?grant_type=refresh_token`. One file, so a crash never keeps a
//! new access token with a refresh token Supabase Auth has already rotated away.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest011 as reqwest;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What `provision` and the refresher write. Never logged: Debug shows no token.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Session {
    pub access_token: String,
    pub refresh_token: String,
    /// Unix seconds, as Supabase Auth says it; the token's own `exp` is what counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a session file (JSON with access_token and refresh_token): {reason}")]
    Format { path: PathBuf, reason: String },
    /// No answer, or 5xx/408/429: tried again with a backoff.
    #[error("the auth service did not answer the refresh: {0}")]
    Unreachable(String),
    /// A 4xx: the refresh token is used, expired or revoked, or the agent is; the agent needs
    /// provisioning again. Tried again slowly, since the file may be replaced meanwhile.
    #[error("the auth service refused the refresh ({status}): {message}")]
    Refused { status: u16, message: String },
}

/// Reads a session file.
pub fn read(path: &Path) -> Result<Session, SessionError> {
    let text = std::fs::read_to_string(path).map_err(|source| SessionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| SessionError::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Replaces `path` with `session` atomically: written beside it with mode 0600, synced, renamed
/// over it, and the directory synced, so a power cut leaves the old session or the new one.
pub fn write(path: &Path, session: &Session) -> Result<(), SessionError> {
    let text = serde_json::to_string_pretty(session).map_err(|e| SessionError::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    crate::durable_file::replace(path, text.as_bytes(), 0o600).map_err(|source| SessionError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The most a refresh comes before the access token's expiry.
pub const REFRESH_MARGIN_MAX_S: i64 = 60;

/// When (unix seconds) to refresh an access token: a quarter of its lifetime before `exp`, at
/// most [`REFRESH_MARGIN_MAX_S`] before it; None when it has no readable `exp` (refresh now).
pub fn refresh_at(access_token: &str) -> Option<i64> {
    let claims = super::unverified_claims(access_token).ok()?;
    let exp = claims["exp"].as_i64()?;
    let iat = claims["iat"]
        .as_i64()
        .unwrap_or(exp - 4 * REFRESH_MARGIN_MAX_S);
    let margin = ((exp - iat) / 4).clamp(1, REFRESH_MARGIN_MAX_S);
    Some(exp - margin)
}

/// Supabase Auth's answer to a token request (GoTrue's shape); extra fields are ignored.
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    refresh_token: String,
    #[serde(default)]
    expires_at: Option<i64>,
}

/// One refresh: `POST {auth_url}/token?grant_type=refresh_token` with `{"refresh_token"}`.
pub async fn refresh(
    http: &reqwest::Client,
    auth_url: &str,
    api_key: Option<&str>,
    refresh_token: &str,
    timeout: Duration,
) -> Result<Session, SessionError> {
    let url = format!(
        "{}/token?grant_type=refresh_token",
        auth_url.trim_end_matches('/')
    );
    let mut request = http
        .post(url)
        .timeout(timeout)
        .json(&serde_json::json!({ "refresh_token": refresh_token }));
    if let Some(key) = api_key {
        request = request.header("apikey", key);
    }
    let response = request
        .send()
        .await
        .map_err(|e| SessionError::Unreachable(e.without_url().to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .map_err(|e| SessionError::Unreachable(e.to_string()))?;
    match status {
        200..=299 => {
            let answer: TokenAnswer = serde_json::from_str(&body).map_err(|e| {
                SessionError::Unreachable(format!("the refresh answer is not a session: {e}"))
            })?;
            Ok(Session {
                access_token: answer.access_token,
                refresh_token: answer.refresh_token,
                expires_at: answer.expires_at,
            })
        }
        408 | 429 | 500..=599 => Err(SessionError::Unreachable(format!("HTTP {status}"))),
        _ => Err(SessionError::Refused {
            status,
            message: auth_error_message(&body),
        }),
    }
}

/// The human part of a Supabase Auth error (`msg`, `error_description`, `message`), never the
/// whole body (which could echo a token).
pub fn auth_error_message(body: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    ["msg", "error_description", "message", "error"]
        .iter()
        .find_map(|k| value[*k].as_str())
        .map(|m| m.chars().take(300).collect())
        .unwrap_or_else(|| "no reason given".into())
}

/// How long to wait after a refused refresh before trying the file again.
const REFUSED_RETRY: Duration = Duration::from_secs(60);
/// The longest sleep between two looks at the file (a re-provisioned session is picked up).
const RECHECK_MAX: Duration = Duration::from_secs(300);

/// Keeps the session in `path` fresh until `cancel`: refreshes at [`refresh_at`], retries an
/// unanswered refresh with a backoff (1 s doubling to 60 s) and a refused one every minute.
pub async fn run_refresher(
    path: PathBuf,
    auth_url: String,
    api_key: Option<String>,
    timeout: Duration,
    cancel: CancellationToken,
) {
    let http = reqwest::Client::new();
    let mut backoff = Duration::from_secs(1);
    loop {
        let wait = match read(&path) {
            Err(e) => {
                warn!("agent session: {e}");
                REFUSED_RETRY
            }
            Ok(session) => {
                let now = jiff::Timestamp::now().as_second();
                let due = refresh_at(&session.access_token).unwrap_or(now);
                if due > now {
                    Duration::from_secs((due - now) as u64).min(RECHECK_MAX)
                } else {
                    match refresh(
                        &http,
                        &auth_url,
                        api_key.as_deref(),
                        &session.refresh_token,
                        timeout,
                    )
                    .await
                    {
                        Ok(fresh) => match write(&path, &fresh) {
                            Ok(()) => {
                                backoff = Duration::from_secs(1);
                                info!(expires_at = fresh.expires_at, "agent session refreshed");
                                Duration::ZERO
                            }
                            Err(e) => {
                                warn!("agent session refreshed but not saved: {e}");
                                REFUSED_RETRY
                            }
                        },
                        Err(e @ SessionError::Refused { .. }) => {
                            warn!(
                                "agent session: {e}; provision the Pi again (autocore-agent provision) if it lasts"
                            );
                            REFUSED_RETRY
                        }
                        Err(e) => {
                            warn!("agent session: {e}; retrying in {backoff:?}");
                            let wait = backoff;
                            backoff = (backoff * 2).min(Duration::from_secs(60));
                            wait
                        }
                    }
                }
            }
        };
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn token(claims: serde_json::Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.sig",
            b64(br#"{"alg":"HS256"}"#),
            b64(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn a_token_is_refreshed_a_quarter_of_its_life_before_expiry_and_at_most_a_minute() {
        assert_eq!(
            refresh_at(&token(serde_json::json!({"iat": 1000, "exp": 1008}))),
            Some(1006)
        );
        assert_eq!(
            refresh_at(&token(serde_json::json!({"iat": 1000, "exp": 4600}))),
            Some(4540)
        );
        assert_eq!(refresh_at(&token(serde_json::json!({"sub": "x"}))), None);
        assert_eq!(refresh_at("not a jwt"), None);
    }

    #[test]
    fn a_session_file_is_replaced_whole_with_mode_0600_and_never_shows_its_tokens() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.json");
        let session = Session {
            access_token: "a.b.c".into(),
            refresh_token: "refresh-secret".into(),
            expires_at: Some(5),
        };
        write(&path, &session).unwrap();
        assert_eq!(read(&path).unwrap(), session);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!format!("{session:?}").contains("secret"));
        std::fs::write(&path, "{}").unwrap();
        assert!(matches!(read(&path), Err(SessionError::Format { .. })));
    }

    #[test]
    fn only_the_reason_of_an_auth_error_is_kept() {
        assert_eq!(
            auth_error_message(
                r#"{"code":400,"error_code":"refresh_token_not_found","msg":"Invalid Refresh Token: Refresh Token Not Found"}"#
            ),
            "Invalid Refresh Token: Refresh Token Not Found"
        );
        assert_eq!(
            auth_error_message(r#"{"error":"invalid_grant","error_description":"revoked"}"#),
            "revoked"
        );
        assert_eq!(auth_error_message("<html>"), "no reason given");
    }
}
