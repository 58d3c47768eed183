//! The operator's surface of the local API: the emergency stop (anyone on the Pi's network may
//! stop; only the operator may reset), macros and hold controls. Everything goes through the
//! automation task, so the interlocks apply exactly as for rules and cloud commands.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use crate::automation::LatchSource;
use crate::automation::task::AutomationInput;
use crate::runtime::Shared;
use crate::safety::RelayRef;

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

/// Whether the request carries the operator token (`[safety] operator_token`).
fn is_operator(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(expected) = &shared.config.safety.operator_token else {
        return false;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Compare digests: equal length, so the comparison time says nothing about the token.
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    digest(given).as_ref() == digest(expected.expose()).as_ref()
}

fn not_operator() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "this needs the operator token ([safety] operator_token) as a bearer token",
    )
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopBody {
    reason: Option<String>,
    by: Option<String>,
}

async fn emergency_stop(
    State(shared): State<Arc<Shared>>,
    body: Option<axum::Json<StopBody>>,
) -> Response {
    let body = body.map(|b| b.0).unwrap_or_default();
    let reason = body
        .reason
        .unwrap_or_else(|| "stop pressed on the local API".into());
    let by = body.by.unwrap_or_else(|| "local operator".into());
    match ask(&shared, |reply| AutomationInput::Stop {
        reason,
        by,
        source: LatchSource::LocalApi,
        reply: Some(reply),
    })
    .await
    {
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
    body: Option<axum::Json<ResetBody>>,
) -> Response {
    if !is_operator(&shared, &headers) {
        return not_operator();
    }
    let by = body
        .and_then(|b| b.0.by)
        .unwrap_or_else(|| "local operator".into());
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
    if !is_operator(&shared, &headers) {
        return not_operator();
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
    if !is_operator(&shared, &headers) {
        return not_operator();
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

type ControlJson = Result<axum::Json<ControlBody>, axum::extract::rejection::JsonRejection>;

/// The operator's control request, or the answer that refuses it.
// The refusal is the handler's whole answer, built once per request: its size does not matter.
#[allow(clippy::result_large_err)]
fn control(
    shared: &Shared,
    headers: &HeaderMap,
    body: ControlJson,
) -> Result<ControlBody, Response> {
    if !is_operator(shared, headers) {
        return Err(not_operator());
    }
    body.map(|b| b.0)
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))
}

async fn hold(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: ControlJson,
) -> Response {
    let body = match control(&shared, &headers, body) {
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

async fn release(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: ControlJson,
) -> Response {
    let body = match control(&shared, &headers, body) {
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
