//! Sync with the backend: `pull` (commands, rules, latch, configs, macros) and `push` (the
//! outbox), the link's state, and the supervisor that notices outages and stalls.

pub mod pacing;
pub(crate) mod pull;
pub(crate) mod push;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cloud::CloudError;
use crate::connectivity::BackendState;
use crate::ingest::record_presence;
use crate::link::LinkEvent;
use crate::metrics::label;
use crate::shared::{Shared, now_ms};
use crate::store::OutboxClass;
use push::push_loop;

/// Poll intervals without outbox progress, while the backend answers, before a stall.
pub const STALL_POLL_INTERVALS: i64 = 10;

pub(crate) fn note_cloud_result(shared: &Arc<Shared>, result: Result<(), &CloudError>) {
    let now = now_ms();
    let event = {
        let mut link = shared.link.lock().unwrap_or_else(|p| p.into_inner());
        let event = match result {
            Ok(()) => link.on_answer(now),
            Err(e) if e.backend_answered() => link.on_answer(now),
            Err(_) => link.on_no_answer(now),
        };
        let mut health = shared.health.lock().unwrap_or_else(|p| p.into_inner());
        health.backend_reachable = link.is_reachable();
        health.outage_began_ms = link.outage_began_ms();
        health.last_backend_error = result.err().map(|e| e.to_string());
        event
    };
    note_backend_state(shared, result);
    shared.metrics.backend_reachable.set(i64::from(
        shared
            .health
            .lock()
            .map(|h| h.backend_reachable)
            .unwrap_or(false),
    ));
    if let Some(event) = event {
        record_link_event(shared, event);
    }
}

/// Records what the backend answered to the agent's token; a change is logged once and shown
/// in the metrics.
pub(crate) fn note_backend_state(shared: &Shared, result: Result<(), &CloudError>) {
    let state = BackendState::from_result(result);
    let changed = {
        let mut health = shared.health.lock().unwrap_or_else(|p| p.into_inner());
        health
            .backend
            .set(state, result.err().map(|e| e.to_string()))
    };
    let Some(previous) = changed else {
        return;
    };
    crate::metrics::move_state(
        &shared.metrics.backend_state,
        previous.label(),
        state.label(),
    );
    let error = result.err().map(|e| e.to_string()).unwrap_or_default();
    match state.degraded_reason() {
        Some(reason) => warn!(state = state.label(), %error, "{reason}"),
        // An outage has its own message (OutageBegan).
        None if previous.degraded_reason().is_some() => {
            info!(
                state = state.label(),
                "backend takes the agent's token again"
            )
        }
        None => {}
    }
}

pub(crate) fn record_link_event(shared: &Arc<Shared>, event: LinkEvent) {
    let shared = shared.clone();
    tokio::spawn(async move {
        match event {
            LinkEvent::OutageBegan { at_ms } => {
                warn!("backend unreachable; controlling locally and queueing");
                if let Ok(mut journal) = shared.journal.lock() {
                    journal.push_event(crate::console::journal::Event {
                        at_ms,
                        event_type: "backend_unreachable".into(),
                        severity: "warning".into(),
                        device: None,
                        message: "backend unreachable; controlling locally and queueing".into(),
                    });
                }
                let _ = shared
                    .store
                    .call(move |s| {
                        for counter in ["telemetry_dropped", "telemetry_dropped_in_doubt"] {
                            let at_start = s.counter(counter)?.to_string();
                            s.set_cursor(&format!("outage_{counter}_at_start"), &at_start)?;
                        }
                        Ok(at_ms)
                    })
                    .await;
            }
            LinkEvent::OutageEnded {
                began_at_ms,
                duration_ms,
            } => {
                let agent = shared.config.agent.id.clone();
                let now = now_ms();
                let result = shared
                    .store
                    .call(move |s| {
                        // The backoff the rows earned failing during the outage outlived its
                        // cause: every row is due at once, not after its 14th doubling.
                        s.outbox_due_now()?;
                        let stats = s.outbox_stats(now)?;
                        let during = |counter: &str| -> Result<i64, crate::store::StoreError> {
                            let at_start: i64 = s
                                .cursor(&format!("outage_{counter}_at_start"))?
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            Ok(s.counter(counter)? - at_start)
                        };
                        let dropped = during("telemetry_dropped")?;
                        let in_doubt = during("telemetry_dropped_in_doubt")?;
                        let mut message = format!(
                            "backend unreachable for {} s; {} rows waiting, {} readings dropped",
                            duration_ms / 1000, stats.depth, dropped
                        );
                        if in_doubt > 0 {
                            message += &format!(
                                " (and {in_doubt} more the backend may have received before)"
                            );
                        }
                        let payload = json!({
                            "agent_id": agent, "event_type": "backend_outage", "severity": "warning",
                            "source": "agent",
                            "message": message,
                            "payload": {"began_at_ms": began_at_ms, "duration_ms": duration_ms,
                                        "queued_rows": stats.depth, "oldest_age_ms": stats.oldest_age_ms,
                                        "readings_dropped": dropped,
                                        "readings_dropped_in_doubt": in_doubt},
                            "occurred_at": crate::cloud::format_timestamp_ms(now),
                        });
                        s.enqueue(OutboxClass::Event, &format!("outage:{began_at_ms}"), &payload, now)?;
                        Ok((stats.depth, payload))
                    })
                    .await;
                let result = result.map(|(depth, report)| {
                    if let Ok(mut journal) = shared.journal.lock() {
                        journal.record(&report, now);
                    }
                    depth
                });
                info!(duration_ms, queued = ?result.ok(), "backend reachable again; draining the outbox");
                shared.notify_outbox();
            }
            LinkEvent::Stalled { since_ms } => {
                warn!(
                    since_ms,
                    "sync stalled while the backend answers; restarting it"
                );
            }
        }
    });
}

/// Runs the outbox pusher and restarts it when the link says sync stalled.
pub(crate) async fn sync_supervisor(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut pusher = tokio::spawn(push_loop(shared.clone(), cancel.clone()));
    let mut check =
        tokio::time::interval(Duration::from_millis(shared.config.cloud.poll_interval_ms));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = pusher.await;
                return;
            }
            _ = check.tick() => {}
        }
        let now = now_ms();
        let Ok(stats) = shared.store.call(move |s| s.outbox_stats(now)).await else {
            continue;
        };
        shared.metrics.outbox_depth.set(stats.depth as i64);
        let cutoff = now - shared.config.mqtt.heartbeat_timeout_ms as i64;
        if let Ok(silent) = shared
            .store
            .call(move |s| s.mark_silent_offline(cutoff))
            .await
        {
            for device in silent {
                warn!(
                    device,
                    "master silent past its heartbeat timeout; marked offline"
                );
                record_presence(&shared, &device, false, None, now).await;
            }
        }
        shared.metrics.outbox_rejected.set(stats.rejected as i64);
        shared
            .metrics
            .outbox_oldest_age_seconds
            .set(stats.oldest_age_ms.unwrap_or(0) as f64 / 1000.0);
        if let Ok(counts) = shared.store.call(|s| s.command_counts()).await {
            for (state, n) in counts {
                shared
                    .metrics
                    .commands
                    .get_or_create(&label("state", &state))
                    .set(n as i64);
            }
        }
        let stalled = {
            let mut link = shared.link.lock().unwrap_or_else(|p| p.into_inner());
            let event = link.check_stall(stats.depth, now);
            let stalled = link.is_stalled();
            if let Ok(mut h) = shared.health.lock() {
                h.sync_stalled = stalled;
            }
            event
        };
        shared.metrics.sync_stalled.set(i64::from(
            shared
                .health
                .lock()
                .map(|h| h.sync_stalled)
                .unwrap_or(false),
        ));
        if let Some(event) = stalled {
            record_link_event(&shared, event);
            shared.metrics.sync_restarts.inc();
            pusher.abort();
            let _ = (&mut pusher).await;
            // Rows waiting for a backoff that outlived its cause are due again at once.
            let _ = shared.store.call(|s| s.outbox_due_now()).await;
            pusher = tokio::spawn(push_loop(shared.clone(), cancel.clone()));
        }
    }
}
