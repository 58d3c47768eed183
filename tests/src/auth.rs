//! A stand-in for what the local stack lacks of hosted Supabase for provisioning
//! (docs/decisions/0016-provisioning-and-claim.md): the `claim-agent` edge function and Supabase
//! Auth's refresh grant. It does what they do, with the backend's own SQL: a claim creates the
//! agent's auth user and calls `claim_agent` in one transaction (a refusal leaves nothing), and
//! every token it issues goes through `custom_access_token_hook`, signed HS256 with the local
//! stack's secret. Tokens live `lifetime`, so tests see refreshes in seconds.
//!
//! Serves `POST /functions/v1/claim-agent` and `POST /auth/v1/token?grant_type=refresh_token`
//! on a free loopback port. Test code only: hosted Supabase has the real ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::StackError;

struct Inner {
    db: Mutex<tokio_postgres::Client>,
    jwt_secret: String,
    rest_url: String,
    auth_url: String,
    lifetime: Duration,
    /// refresh token -> (auth user, session id); a used one is gone (rotation, as GoTrue does).
    refresh_tokens: Mutex<HashMap<String, (Uuid, Uuid)>>,
    refreshes: AtomicUsize,
    refused: AtomicUsize,
}

/// The running stand-in; stops when dropped.
pub struct AuthStandIn {
    inner: Arc<Inner>,
    url: String,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for AuthStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthStandIn")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for AuthStandIn {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl AuthStandIn {
    /// Starts on a free loopback port, talking to the database at `pg_url` (the superuser, as
    /// the edge function's service role would) and handing out `rest_url`.
    pub async fn start(
        pg_url: &str,
        jwt_secret: &str,
        rest_url: &str,
        lifetime: Duration,
    ) -> Result<AuthStandIn, StackError> {
        let (client, connection) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls)
            .await
            .map_err(|e| StackError::io("connect the auth stand-in", std::io::Error::other(e)))?;
        tokio::spawn(connection);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| StackError::io("bind the auth stand-in", e))?;
        let url = format!(
            "http://{}",
            listener
                .local_addr()
                .map_err(|e| StackError::io("auth stand-in address", e))?
        );
        let inner = Arc::new(Inner {
            db: Mutex::new(client),
            jwt_secret: jwt_secret.to_string(),
            rest_url: rest_url.to_string(),
            auth_url: format!("{url}/auth/v1"),
            lifetime,
            refresh_tokens: Mutex::new(HashMap::new()),
            refreshes: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .route("/functions/v1/claim-agent", axum::routing::post(claim))
            .route("/auth/v1/token", axum::routing::post(token))
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(AuthStandIn { inner, url, server })
    }

    /// The project's base URL, as `https://<project>.supabase.co` is.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Refresh grants answered with a new session.
    pub fn refreshes(&self) -> usize {
        self.inner.refreshes.load(Ordering::SeqCst)
    }

    /// Refresh grants refused (unknown refresh token, or the hook refused a revoked agent).
    pub fn refused(&self) -> usize {
        self.inner.refused.load(Ordering::SeqCst)
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    // GoTrue's error shape: {code, error_code, msg}.
    (
        status,
        Json(json!({"code": status.as_u16(), "error_code": code, "msg": message})),
    )
        .into_response()
}

async fn claim(State(inner): State<Arc<Inner>>, Json(body): Json<Value>) -> Response {
    let (Some(code), Some(agent_id)) = (body["code"].as_str(), body["agent_id"].as_str()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "code and agent_id are required",
        );
    };
    let name = body["name"].as_str().map(str::to_string);
    let masters: Vec<String> = body["masters"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let user_id = Uuid::new_v4();
    let owner = {
        let mut db = inner.db.lock().await;
        let tx = match db.transaction().await {
            Ok(tx) => tx,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "db", &e.to_string()),
        };
        let claimed = async {
            tx.execute(
                "insert into auth.users (id, email) values ($1::text::uuid, $2)",
                &[
                    &user_id.to_string(),
                    &format!("{agent_id}@agents.autocore.invalid"),
                ],
            )
            .await?;
            tx.query_one(
                "select owner_id::text, masters from public.claim_agent($1, $2, $3, $4, $5::text::uuid)",
                &[&code, &agent_id, &name, &masters, &user_id.to_string()],
            )
            .await
        }
        .await;
        match claimed {
            Ok(row) => {
                if let Err(e) = tx.commit().await {
                    return error(StatusCode::SERVICE_UNAVAILABLE, "db", &e.to_string());
                }
                let owner: String = row.get(0);
                let masters: Vec<String> = row.get(1);
                (owner, masters)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                let (sqlstate, message) = match e.as_db_error() {
                    Some(db) => (db.code().code().to_string(), db.message().to_string()),
                    None => ("db".into(), e.to_string()),
                };
                // The edge function's mapping: a bad code is 403, a taken id 409, bad input 400.
                let status = match sqlstate.as_str() {
                    "28000" | "42501" => StatusCode::FORBIDDEN,
                    "23505" => StatusCode::CONFLICT,
                    _ => StatusCode::BAD_REQUEST,
                };
                return error(status, &sqlstate, &message);
            }
        }
    };
    match issue(&inner, user_id, Uuid::new_v4(), "password").await {
        Ok(mut session) => {
            session["agent_id"] = json!(agent_id);
            session["owner_id"] = json!(owner.0);
            session["masters"] = json!(owner.1);
            session["rest_url"] = json!(inner.rest_url);
            session["auth_url"] = json!(inner.auth_url);
            (StatusCode::OK, Json(session)).into_response()
        }
        Err(response) => response,
    }
}

async fn token(
    State(inner): State<Arc<Inner>>,
    Query(query): Query<HashMap<String, String>>,
    Json(body): Json<Value>,
) -> Response {
    if query.get("grant_type").map(String::as_str) != Some("refresh_token") {
        return error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only grant_type=refresh_token is served here",
        );
    }
    let presented = body["refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let Some((user_id, session_id)) = inner.refresh_tokens.lock().await.remove(&presented) else {
        inner.refused.fetch_add(1, Ordering::SeqCst);
        return error(
            StatusCode::BAD_REQUEST,
            "refresh_token_not_found",
            "Invalid Refresh Token: Refresh Token Not Found",
        );
    };
    match issue(&inner, user_id, session_id, "token_refresh").await {
        Ok(session) => {
            inner.refreshes.fetch_add(1, Ordering::SeqCst);
            (StatusCode::OK, Json(session)).into_response()
        }
        Err(response) => {
            // GoTrue's refresh is one transaction: refused, the old token stays as it was.
            inner
                .refresh_tokens
                .lock()
                .await
                .insert(presented, (user_id, session_id));
            inner.refused.fetch_add(1, Ordering::SeqCst);
            response
        }
    }
}

/// A new access token (claims as Supabase Auth makes them, then the hook) and refresh token.
async fn issue(
    inner: &Inner,
    user_id: Uuid,
    session_id: Uuid,
    method: &str,
) -> Result<Value, Response> {
    let now = crate::jwt::now_secs();
    let exp = now + inner.lifetime.as_secs().max(1);
    let claims = json!({
        "aud": "authenticated", "exp": exp, "iat": now, "sub": user_id, "role": "authenticated",
        "aal": "aal1", "session_id": session_id, "email": "", "phone": "", "is_anonymous": false,
    });
    let event = json!({"user_id": user_id, "claims": claims, "authentication_method": method});
    let hooked: Value = {
        let db = inner.db.lock().await;
        match db
            .query_one(
                "select public.custom_access_token_hook($1::text::jsonb)::text",
                &[&event.to_string()],
            )
            .await
        {
            Ok(row) => serde_json::from_str(&row.get::<_, String>(0)).unwrap_or(Value::Null),
            Err(e) => {
                return Err(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "hook",
                    &e.to_string(),
                ));
            }
        }
    };
    if let Some(hook_error) = hooked.get("error") {
        let status = hook_error["http_code"]
            .as_u64()
            .and_then(|c| StatusCode::from_u16(c as u16).ok())
            .unwrap_or(StatusCode::FORBIDDEN);
        return Err(error(
            status,
            "hook_refused",
            hook_error["message"]
                .as_str()
                .unwrap_or("refused by the hook"),
        ));
    }
    let access_token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &hooked["claims"],
        &jsonwebtoken::EncodingKey::from_secret(inner.jwt_secret.as_bytes()),
    )
    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "sign", &e.to_string()))?;
    let refresh_token = crate::random_secret(16);
    inner
        .refresh_tokens
        .lock()
        .await
        .insert(refresh_token.clone(), (user_id, session_id));
    Ok(json!({
        "access_token": access_token, "token_type": "bearer", "expires_in": exp - now,
        "expires_at": exp, "refresh_token": refresh_token,
        "user": {"id": user_id, "aud": "authenticated", "role": "authenticated"},
    }))
}
