//! The operator's surface of the local API: the emergency stop (anyone on the Pi's network may
//! stop, whatever the request's body; only the operator may reset), macros and hold controls.
//! Everything goes through the automation task, so the interlocks apply exactly as for rules and
//! cloud commands.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use super::{Cut, read_prefix};
use crate::automation::LatchSource;
use crate::automation::task::AutomationInput;
use crate::safety::RelayRef;
use crate::shared::Shared;

pub fn operator_app(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/emergency", get(emergency_state))
        .route("/emergency/stop", post(emergency_stop))
        .route("/emergency/reset", post(emergency_reset))
        .route("/macros/{id}/run", post(run_macro))
        .route("/macros/{id}/cancel", post(cancel_macro))
        .route("/controls/hold", post(hold))
        .route("/controls/release", post(release))
        .with_state(shared)
}

/// An operator request's answer: JSON, with a clear error message.
fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    answer(status, json!({"error": message.into()}))
}

/// The most of a request body an operator endpoint reads; every valid one is far smaller.
pub const OPERATOR_BODY_BYTES_MAX: usize = 16 * 1024;
/// The most of a stop's body read for its reason; the rest is never read (and never refuses
/// the stop).
pub const STOP_BODY_BYTES_MAX: usize = 4 * 1024;
/// How long a stop waits for its body: a slow one must not delay the stop for long.
pub const STOP_BODY_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// After the stop, the rest of a large body is read and dropped up to this (within
/// [`STOP_BODY_READ_TIMEOUT`]) so that its sender gets the answer.
pub const STOP_BODY_DRAIN_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Whether the request carries the operator token (`[safety] operator_token`); the refusal
/// otherwise. Only headers are read: a caller without the token never gets its body read.
// The refusal is the handler's whole answer, built once per request: its size does not matter.
#[allow(clippy::result_large_err)]
fn operator(shared: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    // No token (or, defensively, an empty one: validation refuses it) closes the endpoints.
    let Some(expected) = shared
        .config
        .safety
        .operator_token
        .as_ref()
        .filter(|t| !t.expose().trim().is_empty())
    else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "the operator endpoints are closed: no [safety] operator_token is configured on this agent",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Compare digests: equal length, so the comparison time says nothing about the token.
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    if !given.is_empty() && digest(given).as_ref() == digest(expected.expose()).as_ref() {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "this needs the operator token ([safety] operator_token) as a bearer token",
        ))
    }
}

/// Reads and drops the rest of a body, up to `max` bytes within `timeout`: a client still
/// sending when the answer comes and the connection closes gets a reset instead of the answer.
async fn drain(body: &mut Body, max: usize, timeout: Duration) {
    use http_body_util::BodyExt as _;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut drained = 0;
    while drained < max {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => drained += frame.data_ref().map_or(0, |d| d.len()),
            _ => return,
        }
    }
}

/// A JSON body of at most [`OPERATOR_BODY_BYTES_MAX`] (empty = `{}`), or the 4xx that refuses it.
#[allow(clippy::result_large_err)]
async fn json_body<T: serde::de::DeserializeOwned>(mut body: Body) -> Result<T, Response> {
    let (bytes, read) =
        read_prefix(&mut body, OPERATOR_BODY_BYTES_MAX, super::BODY_READ_TIMEOUT).await;
    if let Err(cut) = read {
        return Err(error(cut.status(), cut.describe(OPERATOR_BODY_BYTES_MAX)));
    }
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(text).map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn ask<T>(
    shared: &Shared,
    make: impl FnOnce(oneshot::Sender<T>) -> AutomationInput,
) -> Result<T, Response> {
    let (tx, rx) = oneshot::channel();
    shared.automation.send(make(tx)).await.map_err(|_| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )
    })?;
    rx.await.map_err(|_| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )
    })
}

async fn emergency_state(State(shared): State<Arc<Shared>>) -> Response {
    let status = shared
        .automation_status
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    answer(
        StatusCode::OK,
        json!({"latched": status.emergency.is_some(), "emergency": status.emergency,
               "relays_on": status.relays_on, "macros_running": status.macros_running}),
    )
}

/// The reason and author a stop's body gives. A stop is never refused for its body: whatever
/// cannot be read is recorded as unreadable, and the plant stops all the same.
fn stop_reason(bytes: &[u8], read: Result<(), Cut>) -> (String, String) {
    let by = "local operator".to_string();
    if read.is_ok() && bytes.iter().all(u8::is_ascii_whitespace) {
        return ("stop pressed on the local API".into(), by);
    }
    let unreadable = |why: &str| (format!("(unreadable reason: {why})"), by.clone());
    if let Err(cut) = read {
        return unreadable(&cut.describe(STOP_BODY_BYTES_MAX));
    }
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(bytes) else {
        return unreadable("the body is not a JSON object");
    };
    let text = |name: &str| {
        fields
            .get(name)
            .and_then(|v| v.as_str())
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.chars()
                    .take(super::ERROR_MESSAGE_CHARS_MAX)
                    .collect::<String>()
            })
    };
    let reason = match fields.get("reason") {
        None | Some(serde_json::Value::Null) => "stop pressed on the local API".into(),
        Some(_) => text("reason").unwrap_or_else(|| "(unreadable reason: not a text)".into()),
    };
    (reason, text("by").unwrap_or(by))
}

async fn emergency_stop(State(shared): State<Arc<Shared>>, mut body: Body) -> Response {
    let (bytes, read) = read_prefix(&mut body, STOP_BODY_BYTES_MAX, STOP_BODY_READ_TIMEOUT).await;
    let (reason, by) = stop_reason(&bytes, read);
    let stopped = ask(&shared, |reply| AutomationInput::Stop {
        reason,
        by,
        source: LatchSource::LocalApi,
        reply: Some(reply),
    })
    .await;
    // Stopped already: only so that the caller reads the answer.
    if read == Err(Cut::TooLarge) {
        drain(&mut body, STOP_BODY_DRAIN_BYTES_MAX, STOP_BODY_READ_TIMEOUT).await;
    }
    match stopped {
        Ok(newly) => answer(
            StatusCode::OK,
            json!({"latched": true, "newly_latched": newly}),
        ),
        Err(response) => response,
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    by: Option<String>,
}

async fn emergency_reset(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(refusal) = operator(&shared, &headers) {
        return refusal;
    }
    let by = match json_body::<ResetBody>(body).await {
        Ok(b) => b.by.unwrap_or_else(|| "local operator".into()),
        Err(refusal) => return refusal,
    };
    match ask(&shared, |reply| AutomationInput::Reset {
        by,
        source: LatchSource::LocalApi,
        reply: Some(reply),
    })
    .await
    {
        Ok(true) => answer(StatusCode::OK, json!({"latched": false})),
        Ok(false) => error(StatusCode::CONFLICT, "the emergency stop is not latched"),
        Err(response) => response,
    }
}

async fn run_macro(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(refusal) = operator(&shared, &headers) {
        return refusal;
    }
    let by = "local operator".to_string();
    match ask(&shared, |reply| AutomationInput::StartMacro {
        id,
        by,
        reply,
    })
    .await
    {
        Ok(Ok(run)) => answer(StatusCode::OK, json!({"run_id": run})),
        Ok(Err(reason)) => error(StatusCode::CONFLICT, reason),
        Err(response) => response,
    }
}

async fn cancel_macro(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(refusal) = operator(&shared, &headers) {
        return refusal;
    }
    match ask(&shared, |reply| AutomationInput::CancelMacro { id, reply }).await {
        Ok(true) => answer(StatusCode::OK, json!({"cancelled": true})),
        Ok(false) => error(StatusCode::CONFLICT, "that macro is not running"),
        Err(response) => response,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlBody {
    master: String,
    slave_mac: String,
    relay: u8,
    /// For a hold: the longest the relay stays on if nobody releases it.
    max_seconds: Option<u32>,
}

/// The operator's control request, or the answer that refuses it: the token first, then the
/// body.
#[allow(clippy::result_large_err)]
async fn control(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<ControlBody, Response> {
    operator(shared, headers)?;
    json_body(body).await
}

async fn hold(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let body = match control(&shared, &headers, body).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let Some(max_seconds) = body.max_seconds else {
        return error(
            StatusCode::BAD_REQUEST,
            "max_seconds is required for a hold",
        );
    };
    let relay = RelayRef::new(&body.master, &body.slave_mac, body.relay);
    let by = "local operator".to_string();
    match ask(&shared, |reply| AutomationInput::Press {
        relay,
        max_seconds,
        by,
        reply,
    })
    .await
    {
        Ok(Ok(())) => answer(
            StatusCode::OK,
            json!({"held": true, "max_seconds": max_seconds}),
        ),
        Ok(Err(reason)) => error(StatusCode::CONFLICT, reason),
        Err(response) => response,
    }
}

async fn release(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let body = match control(&shared, &headers, body).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let relay = RelayRef::new(&body.master, &body.slave_mac, body.relay);
    match ask(&shared, |reply| AutomationInput::Release { relay, reply }).await {
        Ok(Ok(())) => answer(StatusCode::OK, json!({"held": false})),
        Ok(Err(reason)) => error(StatusCode::CONFLICT, reason),
        Err(response) => response,
    }
}
