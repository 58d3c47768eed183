//! The local HTTP API: `/health` and `/metrics` for operators. Internals never leak into
//! responses: errors become a status code and a short message.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::runtime::{Shared, now_ms};

/// An error as the API shows it: a status and a message fit for the caller.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: &'static str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({"message": self.message}))).into_response()
    }
}

pub fn app(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn health(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let now = now_ms();
    let (stats, devices) = shared
        .store
        .call(move |s| Ok((s.outbox_stats(now)?, s.devices()?)))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "health: store unreadable");
            ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the local store is unreadable",
            }
        })?;
    let health = shared.health.lock().map(|h| h.clone()).unwrap_or_default();
    // Offline is a normal state; a stalled sync is not.
    let status = if health.sync_stalled {
        "degraded"
    } else {
        "ok"
    };
    let body = json!({
        "status": status,
        "agent_id": shared.config.agent.id,
        "version": crate::VERSION,
        "backend_reachable": health.backend_reachable,
        "outage_seconds": health.outage_began_ms.map(|t| (now - t) / 1000),
        "sync_stalled": health.sync_stalled,
        "last_backend_error": health.last_backend_error,
        "outbox": {"depth": stats.depth, "oldest_age_ms": stats.oldest_age_ms, "rejected": stats.rejected},
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
