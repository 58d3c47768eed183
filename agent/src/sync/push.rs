//! Push: the outbox to the backend, in order, with idempotency keys and backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::note_cloud_result;
use crate::cloud::CloudError;
use crate::metrics::label;
use crate::shared::{Shared, now_ms};
use crate::store::{OutboxClass, OutboxRow, Reading};

/// Delivered rows removed by one store job: what a firing may wait for behind a push's answer.
pub const DELIVERED_ROWS_PER_JOB: usize = 100;

pub(crate) async fn push_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let batch = shared.config.cloud.push_batch_rows_max;
    let linger = Duration::from_millis(shared.config.cloud.push_linger_ms);
    // A drain of thousands of rows never waits: it must look at the cancel between groups, or
    // a stop waits for the whole backlog to reach the backend.
    while !cancel.is_cancelled() {
        let now = now_ms();
        let rows = match shared
            .store
            .call(move |s| s.outbox_take_for_push(now, batch))
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                error!(error = %e, "cannot read the outbox");
                Vec::new()
            }
        };
        if rows.is_empty() {
            shared
                .link
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .on_progress(now);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = shared.outbox_ready.notified() => {}
                _ = shared.outbox_soon.notified() => {
                    // What follows shortly shares this push: one request and one removal
                    // instead of one per row. A completion cuts the wait short.
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = shared.outbox_ready.notified() => {}
                        _ = tokio::time::sleep(linger) => {}
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let mut blocked = false;
        for group in group_by_class(rows) {
            // Cut short by a stop, a push is a push whose answer was lost: the rows stay (in
            // doubt) and the idempotency key makes the next run's push of them harmless.
            match cancel
                .run_until_cancelled(push_group(&shared, &group))
                .await
            {
                None => return,
                Some(Ok(())) => {}
                Some(Err(())) => {
                    blocked = true;
                    break;
                }
            }
        }
        if blocked {
            // Order is kept: nothing behind a failed row goes first. Wait for its backoff.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}

/// Consecutive rows of one class, in outbox order.
pub(crate) fn group_by_class(rows: Vec<OutboxRow>) -> Vec<Vec<OutboxRow>> {
    let mut groups: Vec<Vec<OutboxRow>> = Vec::new();
    for row in rows {
        match groups.last_mut() {
            Some(g) if g[0].class == row.class => g.push(row),
            _ => groups.push(vec![row]),
        }
    }
    groups
}

/// Pushes one group; Err means a transient failure that blocks the queue for now.
pub(crate) async fn push_group(shared: &Arc<Shared>, group: &[OutboxRow]) -> Result<(), ()> {
    let class = group[0].class;
    let result: Result<(), CloudError> = match class {
        OutboxClass::Telemetry => {
            // A row that is not a reading cannot be pushed: it is set aside with the reason,
            // never dropped with its neighbours' delivery.
            let mut readings = Vec::with_capacity(group.len());
            let mut pushed = Vec::with_capacity(group.len());
            for row in group {
                match Reading::deserialize(&row.payload) {
                    Ok(reading) => {
                        readings.push(reading);
                        pushed.push(row.seq);
                    }
                    Err(e) => reject(shared, row, &format!("not a reading: {e}")).await,
                }
            }
            if readings.is_empty() {
                return Ok(());
            }
            match shared.cloud.insert_readings(&readings).await {
                Ok(()) => {
                    note_cloud_result(shared, Ok(()));
                    delivered(shared, class, &pushed);
                    return Ok(());
                }
                Err(e) => Err(e),
            }
        }
        OutboxClass::Completion => {
            // In batches through complete_slave_commands; a batch the backend refuses is
            // retried one by one, so that one bad row is set aside alone.
            for chunk in group.chunks(crate::cloud::COMPLETIONS_PER_CALL_MAX) {
                let payloads: Vec<serde_json::Value> =
                    chunk.iter().map(|r| r.payload.clone()).collect();
                match shared.cloud.report_completions(&payloads).await {
                    Ok(()) => {
                        let seqs: Vec<i64> = chunk.iter().map(|r| r.seq).collect();
                        delivered(shared, class, &seqs);
                    }
                    Err(e) if e.is_transient() => return settle_failure(shared, chunk, e).await,
                    Err(e) => {
                        warn!(error = %e, rows = chunk.len(), "completion batch refused; reporting one by one");
                        for row in chunk {
                            match shared.cloud.report_completion(&row.payload).await {
                                Ok(_) => delivered(shared, class, &[row.seq]),
                                Err(e) if e.is_transient() => {
                                    return settle_failure(shared, std::slice::from_ref(row), e)
                                        .await;
                                }
                                Err(e) => reject(shared, row, &e.to_string()).await,
                            }
                        }
                    }
                }
            }
            note_cloud_result(shared, Ok(()));
            return Ok(());
        }
        OutboxClass::Event => {
            let rows: Vec<_> = group.iter().map(event_row).collect();
            shared.cloud.insert_idempotent("event_logs", &rows).await
        }
        OutboxClass::RuleCommand => {
            let rows: Vec<_> = group.iter().map(|r| r.payload.clone()).collect();
            shared
                .cloud
                .insert_idempotent("relay_commands_slave", &rows)
                .await
        }
        OutboxClass::DeviceStatus => {
            // Only the newest presence per device matters; older rows are delivered with it.
            let mut latest: BTreeMap<String, &OutboxRow> = BTreeMap::new();
            for row in group {
                if let Some(d) = row.payload["device_id"].as_str() {
                    latest.insert(d.to_string(), row);
                }
            }
            let mut outcome = Ok(());
            for row in latest.values().filter(|r| r.payload["discovered"] == true) {
                let p = &row.payload;
                let device = p["device_id"].as_str().unwrap_or_default();
                if let Err(e) = shared
                    .cloud
                    .register_discovered_device(
                        device,
                        p["firmware_version"].as_str(),
                        p["mac_address"].as_str(),
                    )
                    .await
                {
                    return settle_failure(shared, group, e).await;
                }
            }
            for row in latest.values().filter(|r| r.payload["discovered"] != true) {
                let patch = json!({
                    "is_online": row.payload["is_online"], "last_seen": row.payload["last_seen"],
                });
                let mut patch = patch;
                if let Some(fw) = row.payload["firmware_version"].as_str() {
                    patch["firmware_version"] = json!(fw);
                }
                let device = row.payload["device_id"].as_str().unwrap_or_default();
                if let Err(e) = shared.cloud.update_device_status(device, &patch).await {
                    outcome = Err(e);
                    break;
                }
            }
            outcome
        }
        OutboxClass::RelayState => {
            // The newest report per slave is the truth; older ones in the group go with it.
            let mut latest: BTreeMap<(String, String), serde_json::Value> = BTreeMap::new();
            for row in group {
                for slave in row.payload["slaves"].as_array().into_iter().flatten() {
                    let key = (
                        slave["master_device_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        slave["slave_mac_address"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    );
                    latest.insert(key, slave.clone());
                }
            }
            let rows: Vec<serde_json::Value> = latest.into_values().collect();
            shared.cloud.upsert_relay_slaves(&rows).await
        }
        OutboxClass::RuleFeedback => push_feedback(shared, group).await,
    };
    match result {
        Ok(()) => {
            note_cloud_result(shared, Ok(()));
            let seqs: Vec<i64> = group.iter().map(|r| r.seq).collect();
            delivered(shared, class, &seqs);
            Ok(())
        }
        Err(e) => settle_failure(shared, group, e).await,
    }
}

/// The engine's reports: execution records, rule errors, the emergency latch (in order within
/// each kind; a group holds a few hundred rows at most).
pub(crate) async fn push_feedback(
    shared: &Arc<Shared>,
    group: &[OutboxRow],
) -> Result<(), CloudError> {
    let of_kind = |kind: &str| -> Vec<serde_json::Value> {
        group
            .iter()
            .filter(|r| r.payload["kind"] == kind)
            .map(|r| r.payload["row"].clone())
            .collect()
    };
    let executions = of_kind("execution");
    if !executions.is_empty() {
        shared
            .cloud
            .insert_idempotent("rule_executions", &executions)
            .await?;
    }
    let errors: Vec<serde_json::Value> = group
        .iter()
        .filter(|r| r.payload["kind"] == "rule_error")
        .map(|r| {
            json!({"id": r.payload["id"], "revision": r.payload["revision"], "error": r.payload["error"]})
        })
        .collect();
    for chunk in errors.chunks(500) {
        shared.cloud.report_rule_errors(chunk).await?;
    }
    // Only the newest latch state matters.
    if let Some(latch) = of_kind("system_status").last() {
        shared.cloud.set_system_status(latch).await?;
    }
    Ok(())
}

pub(crate) fn event_row(row: &OutboxRow) -> serde_json::Value {
    let mut value = row.payload.clone();
    // The outbox key is the event's idempotency key in the cloud too.
    value["client_id"] = json!(uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        row.idempotency_key.as_bytes()
    ));
    value
}

pub(crate) fn delivered(shared: &Arc<Shared>, class: OutboxClass, seqs: &[i64]) {
    // Deferred: a removal lost in a crash only sends the rows again, and the backend takes
    // them idempotently, so it need not cost a commit of its own. The next read of the outbox
    // is queued behind it and so never sees these rows again.
    let answers: Vec<_> = seqs
        .chunks(DELIVERED_ROWS_PER_JOB)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            shared
                .store
                .call_deferred(move |s| s.outbox_delivered(&chunk))
        })
        .collect();
    tokio::spawn(async move {
        for answer in answers {
            if let Err(e) = answer.await {
                error!(error = %e, "could not remove delivered rows; they will be sent again (idempotently)");
            }
        }
    });
    shared
        .metrics
        .outbox_pushed
        .get_or_create(&label("class", class.as_str()))
        .inc_by(seqs.len() as u64);
    shared
        .link
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .on_progress(now_ms());
}

pub(crate) async fn settle_failure(
    shared: &Arc<Shared>,
    group: &[OutboxRow],
    error: CloudError,
) -> Result<(), ()> {
    note_cloud_result(shared, Err(&error));
    let now = now_ms();
    if error.is_transient() {
        let attempts = group.iter().map(|r| r.attempts).max().unwrap_or(0) as usize;
        let delay = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(30))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempts.min(32))
            .unwrap_or(Duration::from_secs(30));
        let seqs: Vec<i64> = group.iter().map(|r| r.seq).collect();
        let reason = error.to_string();
        let in_doubt = error.may_have_executed();
        let _ = shared
            .store
            .call(move |s| {
                s.outbox_retry_later(&seqs, &reason, now + delay.as_millis() as i64, in_doubt)
            })
            .await;
        debug!(error = %error, delay_ms = delay.as_millis() as u64, "push failed; backing off");
        return Err(());
    }
    // A final refusal: set the rows aside with the reason. A batch is retried row by row first,
    // so that one bad reading does not take its neighbours with it.
    if group.len() > 1 && group[0].class == OutboxClass::Telemetry {
        for row in group {
            let single = std::slice::from_ref(row);
            let readings: Vec<Reading> = serde_json::from_value(row.payload.clone())
                .map(|r| vec![r])
                .unwrap_or_default();
            match shared.cloud.insert_readings(&readings).await {
                Ok(()) => delivered(shared, row.class, &[row.seq]),
                Err(e) if e.is_transient() => {
                    return Box::pin(settle_failure(shared, single, e)).await;
                }
                Err(e) => reject(shared, row, &e.to_string()).await,
            }
        }
        return Ok(());
    }
    for row in group {
        reject(shared, row, &error.to_string()).await;
    }
    Ok(())
}

pub(crate) async fn reject(shared: &Arc<Shared>, row: &OutboxRow, reason: &str) {
    error!(class = row.class.as_str(), key = %row.idempotency_key, reason, "backend refused an outbox row for good; kept aside");
    let seq = row.seq;
    let reason = reason.to_string();
    let _ = shared
        .store
        .call(move |s| s.outbox_reject(seq, &reason, now_ms()))
        .await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::store::Reading;

    /// What the backend below saw: requests, readings, and the first request's body.
    #[derive(Default)]
    struct Seen {
        requests: AtomicUsize,
        readings: AtomicUsize,
        first: std::sync::Mutex<Option<serde_json::Value>>,
    }

    /// A backend that answers every request with `null` and notes what it was sent.
    async fn counting_backend() -> (String, Arc<Seen>) {
        let counts = Arc::new(Seen::default());
        let seen = counts.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let readings = body["p_readings"].as_array().map_or(0, Vec::len);
                seen.requests.fetch_add(1, Ordering::SeqCst);
                seen.readings.fetch_add(readings, Ordering::SeqCst);
                seen.first.lock().unwrap().get_or_insert(body);
                "null"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, counts)
    }

    /// Readings handed over one after another within the linger share one request, and
    /// their removal follows (deferred, so without a commit of its own).
    #[tokio::test]
    async fn readings_queued_within_the_linger_share_one_push() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, counts) = counting_backend().await;
        let (shared, _readings) =
            crate::testing::shared_state(dir.path(), &backend, "", "push_linger_ms = 1000");
        let cancel = CancellationToken::new();
        let pusher = tokio::spawn(push_loop(shared.clone(), cancel.clone()));
        // The loop's first look at the (empty) outbox; then it waits for a notice.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for n in 0..5 {
            let reading = Reading {
                device_id: "ESP32_A".into(),
                sensor_key: "ph".into(),
                value: n as f64,
                unit: None,
                recorded_at_ms: 1_000 + n,
                received_at_ms: None,
            };
            shared
                .store
                .call(move |s| s.enqueue_readings(&[reading], 1_000 + n))
                .await
                .unwrap();
            shared.notify_outbox_soon();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        crate::testing::eventually("the readings at the backend", 10, || {
            let counts = counts.clone();
            async move { (counts.readings.load(Ordering::SeqCst) == 5).then_some(()) }
        })
        .await;
        assert_eq!(
            counts.requests.load(Ordering::SeqCst),
            1,
            "one request for the five readings"
        );
        // The rows as `insert_telemetry` takes them: the time as RFC 3339, no agent-only field.
        let body = counts.first.lock().unwrap().clone().unwrap();
        assert_eq!(
            body["p_readings"][1],
            json!({"device_id": "ESP32_A", "sensor_key": "ph", "value": 1.0, "unit": null,
                   "recorded_at": "1970-01-01T00:00:01.001Z"})
        );
        crate::testing::eventually("the delivered rows removed", 10, || {
            let shared = shared.clone();
            async move {
                let left = shared
                    .store
                    .call(|s| s.outbox_due(i64::MAX, 10))
                    .await
                    .unwrap();
                left.is_empty().then_some(())
            }
        })
        .await;
        cancel.cancel();
        pusher.await.unwrap();
    }

    /// A telemetry row that is not a reading is set aside with the reason; its neighbours
    /// are pushed and removed. It was once dropped with their delivery, unseen.
    #[tokio::test]
    async fn a_telemetry_row_that_is_not_a_reading_is_set_aside_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, counts) = counting_backend().await;
        let (shared, _readings) =
            crate::testing::shared_state(dir.path(), &backend, "", "push_linger_ms = 0");
        let reading = |n: i64| {
            json!({"device_id": "ESP32_A", "sensor_key": "ph", "value": n as f64,
                   "unit": null, "recorded_at_ms": 1_000 + n})
        };
        shared
            .store
            .call(move |s| {
                s.enqueue(OutboxClass::Telemetry, "t:1", &reading(1), 1)?;
                // A value that is not a number (NaN is written as null).
                s.enqueue(
                    OutboxClass::Telemetry,
                    "t:2",
                    &json!({"device_id": "ESP32_A",
                    "sensor_key": "ph", "value": null, "recorded_at_ms": 1_002}),
                    1,
                )?;
                s.enqueue(OutboxClass::Telemetry, "t:3", &reading(3), 1)
            })
            .await
            .unwrap();
        let group = shared
            .store
            .call(|s| s.outbox_take_for_push(i64::MAX, 10))
            .await
            .unwrap();
        assert_eq!(group.len(), 3);
        assert_eq!(push_group(&shared, &group).await, Ok(()));
        assert_eq!(counts.readings.load(Ordering::SeqCst), 2);
        crate::testing::eventually("the pushed rows removed, the other set aside", 10, || {
            let shared = shared.clone();
            async move {
                let stats = shared.store.call(|s| s.outbox_stats(0)).await.unwrap();
                (stats.depth == 0 && stats.rejected == 1).then_some(())
            }
        })
        .await;
    }

    #[test]
    fn outbox_rows_are_grouped_by_class_in_order() {
        let row = |seq, class| OutboxRow {
            seq,
            class,
            idempotency_key: seq.to_string(),
            payload: json!({}),
            created_at_ms: 0,
            attempts: 0,
        };
        let groups = group_by_class(vec![
            row(1, OutboxClass::Telemetry),
            row(2, OutboxClass::Telemetry),
            row(3, OutboxClass::Completion),
            row(4, OutboxClass::Telemetry),
        ]);
        let seqs: Vec<Vec<i64>> = groups
            .iter()
            .map(|g| g.iter().map(|r| r.seq).collect())
            .collect();
        assert_eq!(seqs, vec![vec![1, 2], vec![3], vec![4]]);
    }
}
