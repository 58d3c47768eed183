//! The local HTTP API: `/health` and `/metrics` for operators, and under `/rest/v1` the
//! backend's polling RPCs served from SQLite, so that an ESP32 master that polls
//! `get_and_lock_slave_commands` can poll the Pi instead and keep working while the cloud is
//! away. Each master authenticates with its own token (see [`master_token`]) and sees only its
//! own commands and rules. Internals never leak into responses: every error becomes one
//! PostgREST-shaped body (`code`, `message`, `details`, `hint`) with a message fit for the caller.

pub(crate) mod operator;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::cloud::format_timestamp_ms;
use crate::config::{MasterSection, Transport};
use crate::metrics::{Metrics, label};
use crate::shared::{Shared, now_ms};
use crate::store::polling::{PolledCommand, PolledFinish};
use crate::store::{CommandOutcome, CommandState, RuleRecord, StoreError, StoreHandle};

/// What a master's token authenticates: HMAC-SHA256 under the master's key of this prefix
/// followed by the master's device id. The prefix keeps the token from ever equalling a
/// command signature made with the same key.
pub const TOKEN_CONTEXT: &str = "autocore/local-api/v1:";
/// `p_limit` of `get_and_lock_slave_commands`, as the backend bounds it.
pub const COMMANDS_PER_POLL_MAX: i64 = 100;
/// `p_timeout_seconds` of `get_and_lock_slave_commands`, as the backend bounds it.
pub const LOCK_TIMEOUT_S_MAX: i64 = 3_600;
/// `p_limit` of `get_active_decision_rules`, as the backend bounds it.
pub const RULES_PER_CALL_MAX: i64 = 1_000;
/// `execution_time_ms` as `relay_commands_slave` accepts it (one day).
pub const EXECUTION_TIME_MS_MAX: i64 = 86_400_000;
/// An error message is cut to this many characters, as `fail_slave_command` does.
pub const ERROR_MESSAGE_CHARS_MAX: usize = 1_000;
/// A request body to the polling API; every valid one is far smaller.
pub const REQUEST_BODY_BYTES_MAX: usize = 16 * 1024;
/// A connection that has not sent a whole request head within this is closed. hyper's timer
/// also runs while a kept-alive connection waits for its next request, so this is the idle
/// timeout too: a held-open connection costs a slot for this long at most.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A body (read only after the caller is authenticated) must arrive within this.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; one more is closed at once. Masters poll on a few each, and an
/// operator needs one: far fewer than this on a Pi's network.
pub const CONNECTIONS_MAX: usize = 256;

/// The bearer token of master `device_id` for the local API: the lowercase hex of
/// HMAC-SHA256(`key`, `"autocore/local-api/v1:" + device_id`), where `key` is the master's
/// command-signing key as bytes. Firmware computes the same (PROTOCOL.md, "Polling the Pi
/// instead of the backend").
pub fn master_token(key: &[u8], device_id: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    hex::encode(ring::hmac::sign(&key, token_message(device_id).as_bytes()).as_ref())
}

fn token_message(device_id: &str) -> String {
    format!("{TOKEN_CONTEXT}{device_id}")
}

/// An error as the API shows it: a status and a PostgREST-style body fit for the caller.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: Cow<'static, str>,
    hint: Option<&'static str>,
}

impl ApiError {
    /// A parameter is missing, of the wrong type or out of range (Postgres'
    /// `invalid_parameter_value`, which is what the backend's RPCs raise).
    fn bad_parameter(message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "22023",
            message: message.into(),
            hint: None,
        }
    }

    /// The body is not JSON, or not what PostgREST would take.
    fn bad_body(message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "PGRST102",
            message: message.into(),
            hint: None,
        }
    }

    fn unauthorized() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "PGRST301",
            message: "the bearer token is missing or belongs to no master of this agent".into(),
            hint: Some(
                "a master's token is hex(HMAC-SHA256(master key, \"autocore/local-api/v1:\" + device_id))",
            ),
        }
    }

    /// The store failed: the reason goes to the log, the caller learns only that it failed.
    fn store(error: &StoreError, what: &'static str) -> ApiError {
        tracing::error!(error = %error, what, "local API: store failed");
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "PGRST000",
            message: "the local store is unavailable".into(),
            hint: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "code": self.code,
            "message": self.message,
            "details": null,
            "hint": self.hint,
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        response
    }
}

/// A configured master as the polling API knows it.
#[derive(Debug)]
struct MasterAccess {
    device_id: String,
    key: ring::hmac::Key,
    transport: Transport,
}

/// What the polling endpoints need, and nothing else: the store, each master's key and
/// transport, the metrics, and the clock.
#[derive(Debug, Clone)]
pub struct LocalApi {
    store: StoreHandle,
    masters: Arc<[MasterAccess]>,
    metrics: Arc<Metrics>,
    clock: fn() -> i64,
}

impl LocalApi {
    /// `masters` as configured; a master whose key is not hex (validation refuses that at
    /// start-up) cannot authenticate.
    pub fn new(store: StoreHandle, masters: &[MasterSection], metrics: Arc<Metrics>) -> LocalApi {
        let masters = masters
            .iter()
            .filter_map(|m| {
                let key = hex::decode(m.key.expose()).ok()?;
                Some(MasterAccess {
                    device_id: m.device_id.clone(),
                    key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
                    transport: m.transport,
                })
            })
            .collect();
        LocalApi {
            store,
            masters,
            metrics,
            clock: now_ms,
        }
    }

    /// The same API with another clock (Unix milliseconds), for tests of lock timeouts and
    /// expiry.
    pub fn with_clock(mut self, clock: fn() -> i64) -> LocalApi {
        self.clock = clock;
        self
    }

    /// The master whose token the request carries. Tags are compared in constant time (ring's
    /// `hmac::verify`), so a guessed token learns nothing about a key from the timing.
    fn authenticate(&self, headers: &HeaderMap) -> Result<&MasterAccess, ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(ApiError::unauthorized)?;
        let tag = hex::decode(token).map_err(|_| ApiError::unauthorized())?;
        self.masters
            .iter()
            .find(|m| {
                ring::hmac::verify(&m.key, token_message(&m.device_id).as_bytes(), &tag).is_ok()
            })
            .ok_or_else(ApiError::unauthorized)
    }
}

pub fn app(shared: Arc<Shared>) -> Router {
    let local = LocalApi::new(
        shared.store.clone(),
        &shared.config.masters,
        shared.metrics.clone(),
    );
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(shared.clone())
        .merge(operator::operator_app(shared.clone()))
        .merge(crate::console::console_app(shared))
        .merge(polling_app(local))
}

/// The backend's polling surface under `/rest/v1`, as PostgREST serves it.
pub fn polling_app(api: LocalApi) -> Router {
    Router::new()
        .route(
            "/rest/v1/rpc/get_and_lock_slave_commands",
            post(get_and_lock_slave_commands),
        )
        .route(
            "/rest/v1/rpc/complete_slave_command",
            post(complete_slave_command),
        )
        .route("/rest/v1/rpc/fail_slave_command", post(fail_slave_command))
        .route(
            "/rest/v1/rpc/get_active_decision_rules",
            post(get_active_decision_rules),
        )
        .route("/rest/v1/relay_commands_slave", patch(patch_command))
        .with_state(api)
}

/// The bounds of the local API's connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub header_read_timeout: Duration,
    pub connections_max: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            connections_max: CONNECTIONS_MAX,
        }
    }
}

/// Serves `app` on `listener` (HTTP/1.1) until `shutdown`, within `limits`: axum::serve keeps
/// a silent or idle connection forever and accepts without bound, so a few thousand held-open
/// sockets would starve the Pi of file descriptors and the operator of the emergency stop.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.connections_max));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, usually: wait instead of spinning.
                    tracing::warn!(error = %e, "local API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(
                limit = limits.connections_max,
                "local API: connection refused, at the limit"
            );
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let connection =
                builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
                }
            }
        });
    }
    let drained = async { while connections.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drained).await;
}

// ------------------------------------------------------------------------------ operators

async fn health(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let now = now_ms();
    let (stats, devices) = shared
        .store
        .call(move |s| Ok((s.outbox_stats(now)?, s.devices()?)))
        .await
        .map_err(|e| ApiError::store(&e, "health"))?;
    let health = shared.health.lock().map(|h| h.clone()).unwrap_or_default();
    // Offline is a normal state; a refusal (credentials, CA, token) or a stalled sync is not.
    let reasons = health.degraded_reasons();
    let status = if reasons.is_empty() { "ok" } else { "degraded" };
    let body = json!({
        "status": status,
        "degraded_reasons": reasons,
        "agent_id": shared.config.agent.id,
        "version": crate::VERSION,
        "mqtt_connected": health.mqtt.state == crate::connectivity::MqttState::Connected,
        "mqtt": health.mqtt,
        "backend": health.backend,
        "backend_reachable": health.backend_reachable,
        "outage_seconds": health.outage_began_ms.map(|t| (now - t) / 1000),
        "sync_stalled": health.sync_stalled,
        "last_backend_error": health.last_backend_error,
        "outbox": {"depth": stats.depth, "oldest_age_ms": stats.oldest_age_ms, "rejected": stats.rejected},
        "automation": shared.automation_status.lock().map(|a| a.clone()).unwrap_or_default(),
        "masters": devices.iter().map(|(id, online, last_seen)| json!({"device_id": id, "online": online, "last_seen_ms": last_seen})).collect::<Vec<_>>(),
    });
    let code = if health.sync_stalled {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    Ok((code, axum::Json(body)).into_response())
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}

// -------------------------------------------------------------------------------- polling

/// The body, read only after the caller is authenticated: at most
/// [`REQUEST_BODY_BYTES_MAX`], within [`BODY_READ_TIMEOUT`].
async fn read_body(mut body: Body) -> Result<Bytes, ApiError> {
    match read_prefix(&mut body, REQUEST_BODY_BYTES_MAX, BODY_READ_TIMEOUT).await {
        (bytes, Ok(())) => Ok(Bytes::from(bytes)),
        (_, Err(cut)) => Err(ApiError {
            status: cut.status(),
            code: "PGRST102",
            message: "the request body could not be read".into(),
            hint: Some("bodies are JSON objects of at most 16 KiB"),
        }),
    }
}

/// Why a body was not read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// More than the bound: the rest is left unread.
    TooLarge,
    /// It did not arrive within the time allowed.
    TooSlow,
    /// The connection failed mid-way.
    Failed,
}

impl Cut {
    /// The answer to a request whose body was cut short.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Cut::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Cut::TooSlow => StatusCode::REQUEST_TIMEOUT,
            Cut::Failed => StatusCode::BAD_REQUEST,
        }
    }

    pub(crate) fn describe(self, max: usize) -> String {
        match self {
            Cut::TooLarge => format!("the body is larger than {max} bytes"),
            Cut::TooSlow => "the body did not arrive in time".into(),
            Cut::Failed => "the body was cut off".into(),
        }
    }
}

/// Up to `max` bytes of the body, and why the read stopped short if it did (the rest is left
/// in `body`).
pub(crate) async fn read_prefix(
    body: &mut Body,
    max: usize,
    timeout: Duration,
) -> (Vec<u8>, Result<(), Cut>) {
    use http_body_util::BodyExt as _;
    let mut read = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => return (read, Ok(())),
            Ok(Some(Err(_))) => return (read, Err(Cut::Failed)),
            Err(_) => return (read, Err(Cut::TooSlow)),
        };
        if let Ok(data) = frame.into_data() {
            let room = max - read.len();
            if data.len() > room {
                read.extend_from_slice(&data[..room]);
                return (read, Err(Cut::TooLarge));
            }
            read.extend_from_slice(&data);
        }
    }
}

/// RPC arguments from a body; an empty body means "all defaults", as PostgREST takes it.
async fn arguments<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let body = read_body(body).await?;
    let text: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &body
    };
    serde_json::from_slice(text).map_err(|e| match e.classify() {
        // About the caller's own arguments: safe and useful to repeat.
        serde_json::error::Category::Data => ApiError::bad_parameter(e.to_string()),
        _ => ApiError::bad_body("the request body is not valid JSON"),
    })
}

fn in_range(name: &str, value: Option<i64>, min: i64, max: i64) -> Result<i64, ApiError> {
    match value {
        Some(v) if (min..=max).contains(&v) => Ok(v),
        Some(v) => Err(ApiError::bad_parameter(format!(
            "{name} must be between {min} and {max}, got {v}"
        ))),
        None => Err(ApiError::bad_parameter(format!(
            "{name} must be between {min} and {max}, got null"
        ))),
    }
}

// The backend's defaults for arguments left out.
fn default_commands_per_poll() -> Option<i64> {
    Some(5)
}
fn default_lock_timeout_s() -> Option<i64> {
    Some(30)
}
fn default_rules_per_call() -> Option<i64> {
    Some(10)
}

// An argument present as null is refused like the backend refuses it; an absent one takes the
// backend's default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LockArgs {
    p_master_device_id: String,
    #[serde(default = "default_commands_per_poll")]
    p_limit: Option<i64>,
    #[serde(default = "default_lock_timeout_s")]
    p_timeout_seconds: Option<i64>,
}

async fn get_and_lock_slave_commands(
    State(api): State<LocalApi>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let master = api.authenticate(&headers)?;
    let args: LockArgs = arguments(body).await?;
    let limit = in_range("p_limit", args.p_limit, 1, COMMANDS_PER_POLL_MAX)?;
    let timeout_s = in_range(
        "p_timeout_seconds",
        args.p_timeout_seconds,
        1,
        LOCK_TIMEOUT_S_MAX,
    )?;
    // Like RLS: another master's id, or a master whose commands go over MQTT, is an empty list.
    if args.p_master_device_id != master.device_id || master.transport != Transport::Poll {
        return Ok(axum::Json(Vec::<Value>::new()).into_response());
    }
    let device = master.device_id.clone();
    let now = (api.clock)();
    let handed = api
        .store
        .call(move |s| s.lock_polled_commands(&device, limit as usize, timeout_s * 1_000, now))
        .await
        .map_err(|e| ApiError::store(&e, "get_and_lock_slave_commands"))?;
    if handed.expired > 0 {
        tracing::warn!(master = %master.device_id, commands = handed.expired, "commands expired before their master polled them");
        api.metrics
            .commands_finished
            .get_or_create(&label("outcome", "expired"))
            .inc_by(handed.expired as u64);
    }
    let locked = handed.commands;
    if !locked.is_empty() {
        tracing::info!(master = %master.device_id, commands = locked.len(), "commands handed to a polling master");
    }
    let rows: Vec<Value> = locked.iter().map(command_row).collect();
    Ok(axum::Json(rows).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteArgs {
    p_command_id: i64,
    #[serde(default)]
    p_execution_time_ms: Option<i64>,
    #[serde(default)]
    p_relay_states: Option<Vec<bool>>,
}

async fn complete_slave_command(
    State(api): State<LocalApi>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let master = api.authenticate(&headers)?;
    let args: CompleteArgs = arguments(body).await?;
    let outcome = CommandOutcome::Completed {
        execution_time_ms: execution_time("p_execution_time_ms", args.p_execution_time_ms)?
            .unwrap_or(0),
        relay_states: args.p_relay_states,
    };
    let rows = finish(&api, master, args.p_command_id, outcome).await?;
    Ok(axum::Json(rows).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailArgs {
    p_command_id: i64,
    #[serde(default)]
    p_error_message: Option<String>,
    #[serde(default)]
    p_execution_time_ms: Option<i64>,
}

async fn fail_slave_command(
    State(api): State<LocalApi>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let master = api.authenticate(&headers)?;
    let args: FailArgs = arguments(body).await?;
    let reason = args
        .p_error_message
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad_parameter("p_error_message is required"))?;
    let outcome = CommandOutcome::Failed {
        reason: reason.chars().take(ERROR_MESSAGE_CHARS_MAX).collect(),
        execution_time_ms: execution_time("p_execution_time_ms", args.p_execution_time_ms)?,
    };
    let rows = finish(&api, master, args.p_command_id, outcome).await?;
    Ok(axum::Json(rows).into_response())
}

/// An execution time as `relay_commands_slave` accepts it.
fn execution_time(name: &str, value: Option<i64>) -> Result<Option<u32>, ApiError> {
    value
        .map(|v| in_range(name, Some(v), 0, EXECUTION_TIME_MS_MAX).map(|v| v as u32))
        .transpose()
}

/// The columns a master may set when it ends a command with a PATCH, as the seed's
/// `markCommandCompleted` does. `completed_at` and `updated_at` are taken but the Pi stamps
/// its own time, as the backend's RPCs use `now()`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandPatch {
    status: String,
    #[serde(default)]
    execution_time_ms: Option<i64>,
    #[serde(default)]
    error_message: Option<String>,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "accepted from the seed's masters, deliberately not used"
    )]
    completed_at: Option<String>,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "accepted from the seed's masters, deliberately not used"
    )]
    updated_at: Option<String>,
}

async fn patch_command(
    State(api): State<LocalApi>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let master = api.authenticate(&headers)?;
    let Query(filters) = query.map_err(|_| ApiError::bad_body("the query string is malformed"))?;
    let id = command_filter(&filters)?;
    let patch: CommandPatch = arguments(body).await?;
    let execution_time_ms = execution_time("execution_time_ms", patch.execution_time_ms)?;
    let outcome = match patch.status.as_str() {
        "completed" => CommandOutcome::Completed {
            execution_time_ms: execution_time_ms.unwrap_or(0),
            relay_states: None,
        },
        "failed" => CommandOutcome::Failed {
            reason: patch
                .error_message
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "failed (the master gave no reason)".into())
                .chars()
                .take(ERROR_MESSAGE_CHARS_MAX)
                .collect(),
            execution_time_ms,
        },
        other => {
            return Err(ApiError::bad_parameter(format!(
                "status {other:?} cannot be set on the Pi: only \"completed\" or \"failed\""
            )));
        }
    };
    let rows = finish(&api, master, id, outcome).await?;
    let representation = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "return=representation");
    if representation {
        Ok(axum::Json(rows).into_response())
    } else {
        Ok(StatusCode::NO_CONTENT.into_response())
    }
}

/// The one filter the Pi serves on `relay_commands_slave`: `id=eq.N` (and a `select`, which
/// it ignores: the whole row always comes back). A PATCH without it would, on PostgREST,
/// change every row the caller may see; here it is refused.
fn command_filter(filters: &[(String, String)]) -> Result<i64, ApiError> {
    let mut id = None;
    for (name, value) in filters {
        match name.as_str() {
            "select" => {}
            "id" if id.is_none() => {
                id = value
                    .strip_prefix("eq.")
                    .and_then(|v| v.parse::<i64>().ok());
                if id.is_none() {
                    return Err(ApiError::bad_parameter(format!(
                        "id={value} is not a filter the Pi serves: use id=eq.<command id>"
                    )));
                }
            }
            _ => {
                return Err(ApiError::bad_parameter(format!(
                    "{name}={value} is not a filter the Pi serves: use id=eq.<command id>"
                )));
            }
        }
    }
    id.ok_or_else(|| ApiError::bad_parameter("a PATCH needs the filter id=eq.<command id>"))
}

/// Ends a command of `master` and returns it as rows, as the backend's RPCs do: the row (as
/// it now is) when it is the master's own, nothing otherwise. Only a polling master ends
/// commands here; an MQTT master's commands are the delivery task's to end.
async fn finish(
    api: &LocalApi,
    master: &MasterAccess,
    id: i64,
    outcome: CommandOutcome,
) -> Result<Vec<Value>, ApiError> {
    if master.transport != Transport::Poll {
        return Ok(Vec::new());
    }
    let device = master.device_id.clone();
    let now = (api.clock)();
    let label_value = match &outcome {
        CommandOutcome::Completed { .. } => "completed",
        CommandOutcome::Failed { .. } => "failed",
        CommandOutcome::Expired => "expired",
    };
    let finished = api
        .store
        .call(move |s| s.finish_polled_command(&device, id, &outcome, now))
        .await
        .map_err(|e| ApiError::store(&e, "finish a polled command"))?;
    match finished {
        PolledFinish::NotFound => Ok(Vec::new()),
        PolledFinish::Found { command, changed } => {
            if changed {
                tracing::info!(command = id, master = %master.device_id, outcome = label_value, "polled command ended");
                api.metrics
                    .commands_finished
                    .get_or_create(&label("outcome", label_value))
                    .inc();
            }
            Ok(vec![command_row(&command)])
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesArgs {
    p_device_id: String,
    #[serde(default = "default_rules_per_call")]
    p_limit: Option<i64>,
}

async fn get_active_decision_rules(
    State(api): State<LocalApi>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let master = api.authenticate(&headers)?;
    let args: RulesArgs = arguments(body).await?;
    let limit = in_range("p_limit", args.p_limit, 1, RULES_PER_CALL_MAX)?;
    if args.p_device_id != master.device_id {
        return Ok(axum::Json(Vec::<Value>::new()).into_response());
    }
    let device = master.device_id.clone();
    let rules = api
        .store
        .call(move |s| s.active_rules(&device, limit as usize))
        .await
        .map_err(|e| ApiError::store(&e, "get_active_decision_rules"))?;
    let rows: Vec<Value> = rules.iter().map(rule_row).collect();
    Ok(axum::Json(rows).into_response())
}

/// A command as a `relay_commands_slave` row. `created_at` is when the Pi accepted it (the
/// cloud's own creation time is not mirrored); `locked_at`/`locked_by` are the local lock.
fn command_row(polled: &PolledCommand) -> Value {
    let c = &polled.command;
    let ended = matches!(c.state, CommandState::Completed | CommandState::Failed);
    let updated = polled
        .finished_at_ms
        .or(c.last_sent_at_ms)
        .unwrap_or(polled.accepted_at_ms);
    let type_rank = c.command_type.rank();
    let columns = crate::command::actions_to_columns(&c.actions);
    json!({
        "id": c.id,
        "master_device_id": c.master_device_id,
        "user_email": null,
        "master_mac_address": null,
        "slave_device_id": c.slave_device_id,
        "slave_mac_address": c.slave_mac_address,
        "relay_numbers": columns.relay_numbers,
        "actions": columns.actions,
        "duration_seconds": columns.duration_seconds,
        "command_type": c.command_type,
        "triggered_by": c.triggered_by,
        "priority": c.priority,
        "rule_id": c.rule_id,
        "rule_name": c.rule_name,
        "status": polled.cloud_status(),
        "created_at": format_timestamp_ms(polled.accepted_at_ms),
        "updated_at": format_timestamp_ms(updated),
        "expires_at": format_timestamp_ms(c.expires_at_ms),
        "locked_at": c.polled_by.as_ref().and(c.last_sent_at_ms).map(format_timestamp_ms),
        "locked_by": c.polled_by,
        "delivery_count": c.attempts,
        "sent_at": null,
        "completed_at": polled.finished_at_ms.filter(|_| ended).map(format_timestamp_ms),
        "execution_time_ms": polled.execution_time_ms,
        "error_message": polled.error_message,
        "type_rank": type_rank,
    })
}

/// A rule as a `decision_rules` row, from the mirror (which keeps no `created_by` or
/// `created_at`; `updated_at` is the change the mirror last applied).
fn rule_row(rule: &RuleRecord) -> Value {
    json!({
        "id": rule.id,
        "device_id": rule.device_id,
        "rule_id": rule.rule_id,
        "rule_name": rule.rule_name,
        "rule_description": rule.rule_description,
        "rule_json": rule.rule_json,
        "enabled": rule.enabled,
        "priority": rule.priority,
        "cooldown_seconds": rule.cooldown_seconds,
        "max_executions_per_hour": rule.max_executions_per_hour,
        "updated_at": rule.changed_at,
        "revision": rule.revision,
    })
}

#[cfg(test)]
mod surface_tests;
#[cfg(test)]
mod tests;
