//! Pull: what the backend has for this agent, read on the poll interval.

use std::sync::Arc;
use std::time::Duration;

use firmware_protocol::DeviceId;
use rumqttc::QoS;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::note_backend_state;
use super::note_cloud_result;
use crate::automation::task::AutomationInput;
use crate::metrics::label;
use crate::shared::{DeliveryInput, Shared, now_ms};
use crate::store::{CommandOutcome, OutboxClass};

/// Rule changes read per request.
pub const RULE_CHANGES_PAGE_MAX: u32 = 500;
/// The rules mirror re-reads this far behind its cursor (see docs/decisions/0001).
pub const RULE_CURSOR_OVERLAP_MS: i64 = 5_000;
/// Device configurations are checked every this many poll intervals.
pub const CONFIG_CHECK_POLLS: u64 = 5;

pub(crate) async fn poll_loop(
    shared: Arc<Shared>,
    delivery: mpsc::Sender<DeliveryInput>,
    cancel: CancellationToken,
) {
    let mut tick =
        tokio::time::interval(Duration::from_millis(shared.config.cloud.poll_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let masters: Vec<String> = shared
        .config
        .masters
        .iter()
        .map(|m| m.device_id.clone())
        .collect();
    let mut polls: u64 = 0;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Completions go out before new locks: a command a master finished while the backend
        // was away would otherwise see its lock time out and be handed out again.
        let completions_waiting = shared
            .store
            .call(|s| s.completions_waiting(now_ms()))
            .await
            .unwrap_or(false);
        for master in &masters {
            if !completions_waiting {
                pull_commands(&shared, master, &delivery).await;
            }
            pull_rules(&shared, master).await;
        }
        pull_latch(&shared).await;
        polls += 1;
        if polls % CONFIG_CHECK_POLLS == 1 {
            deliver_configs(&shared, &masters).await;
            pull_macros(&shared).await;
        }
    }
}

/// The owner's emergency latch as the dashboard sees it.
pub(crate) async fn pull_latch(shared: &Arc<Shared>) {
    let result = shared.cloud.system_status().await;
    // Read on every poll, with or without masters: the backend's answer to the token shows in
    // /health even on an agent without masters. (Outages are the command and push paths' to
    // judge, as before.)
    note_backend_state(shared, result.as_ref().map(|_| ()));
    match result {
        Ok(Some(row)) => {
            let _ = shared
                .automation
                .send(AutomationInput::CloudLatch(row))
                .await;
        }
        Ok(None) => {}
        Err(e) => debug!(error = %e, "could not read system_status"),
    }
}

/// The macros this agent runs, mirrored so they run offline too.
pub(crate) async fn pull_macros(shared: &Arc<Shared>) {
    let rows = match shared.cloud.macros().await {
        Ok(rows) => rows,
        Err(e) => {
            debug!(error = %e, "could not read macros");
            return;
        }
    };
    let mirror: Vec<(String, i64, serde_json::Value)> = rows
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_string(),
                r["revision"].as_i64().unwrap_or(0),
                r.clone(),
            )
        })
        .collect();
    if let Err(e) = shared.store.call(move |s| s.replace_macros(&mirror)).await {
        error!(error = %e, "could not mirror macros");
        return;
    }
    let _ = shared.automation.send(AutomationInput::Macros(rows)).await;
}

/// Publishes a master's configuration (retained, so the broker hands it to the master whenever
/// it reconnects) each time its version moves in the cloud.
pub(crate) async fn deliver_configs(shared: &Arc<Shared>, masters: &[String]) {
    let rows = match shared.cloud.device_configs(masters).await {
        Ok(rows) => rows,
        Err(e) => {
            debug!(error = %e, "could not read device configurations");
            return;
        }
    };
    for row in rows {
        let device = row.device_id.clone();
        let delivered = shared
            .store
            .call(move |s| s.delivered_config_version(&device))
            .await
            .ok()
            .flatten();
        if delivered.is_some_and(|v| v >= row.config_version) {
            continue;
        }
        // An empty object means "nothing authored yet": nothing to deliver.
        if row.config.as_object().is_some_and(|o| o.is_empty()) {
            continue;
        }
        let mut config = row.config.clone();
        config["v"] = json!(firmware_protocol::PROTOCOL_VERSION);
        let encoded = serde_json::from_value::<firmware_protocol::message::DeviceConfig>(config)
            .map_err(|e| e.to_string())
            .and_then(|c| firmware_protocol::Payload::encode(&c).map_err(|e| e.to_string()));
        let topic = DeviceId::new(row.device_id.as_str())
            .map(|id| firmware_protocol::Topic::device_config(&id).to_string())
            .map_err(|e| e.to_string());
        match (encoded, topic) {
            (Ok(bytes), Ok(topic)) => {
                if let Err(e) = shared
                    .mqtt
                    .publish(topic, QoS::AtLeastOnce, true, bytes)
                    .await
                {
                    warn!(device = %row.device_id, error = %e, "could not publish the configuration; will retry");
                    continue;
                }
                shared
                    .metrics
                    .mqtt_messages_out
                    .get_or_create(&label("kind", "config"))
                    .inc();
                info!(device = %row.device_id, version = row.config_version, "configuration delivered");
            }
            (Err(reason), _) | (_, Err(reason)) => {
                let reason = reason.to_string();
                warn!(device = %row.device_id, version = row.config_version, reason, "configuration refused; not delivered");
                let (device, version, agent) = (
                    row.device_id.clone(),
                    row.config_version,
                    shared.config.agent.id.clone(),
                );
                let _ = shared
                    .store
                    .call(move |s| {
                        let payload = json!({
                            "device_id": device, "agent_id": agent, "event_type": "config_rejected",
                            "severity": "error", "source": "agent",
                            "message": format!("configuration version {version} not delivered: {reason}"),
                            "occurred_at": crate::cloud::format_timestamp_ms(now_ms()),
                        });
                        s.enqueue(OutboxClass::Event, &format!("config:{device}:{version}"), &payload, now_ms())
                    })
                    .await;
            }
        }
        let (device, version) = (row.device_id.clone(), row.config_version);
        let _ = shared
            .store
            .call(move |s| s.set_delivered_config_version(&device, version))
            .await;
    }
}

pub(crate) async fn pull_commands(
    shared: &Arc<Shared>,
    master: &str,
    delivery: &mpsc::Sender<DeliveryInput>,
) {
    let cfg = &shared.config.cloud;
    // The same name until a call is answered: a retry after a lost answer gets what that call
    // locked instead of leaving it locked in the cloud until the lock timeout.
    let request_id = match shared.lock_requests.lock() {
        Ok(mut open) => open
            .entry(master.to_string())
            .or_insert_with(|| uuid::Uuid::new_v4().simple().to_string())
            .clone(),
        Err(_) => uuid::Uuid::new_v4().simple().to_string(),
    };
    let rows = match shared
        .cloud
        .lock_commands(
            master,
            cfg.lock_batch_max,
            cfg.lock_timeout_seconds,
            &request_id,
        )
        .await
    {
        Ok(rows) => {
            note_cloud_result(shared, Ok(()));
            if let Ok(mut open) = shared.lock_requests.lock() {
                open.remove(master);
            }
            rows
        }
        Err(e) => {
            note_cloud_result(shared, Err(&e));
            debug!(master, error = %e, "could not pull commands");
            return;
        }
    };
    for row in rows {
        match row.to_record() {
            Ok(record) => {
                let id = record.id;
                match shared.store.call(move |s| s.command(id)).await {
                    Ok(Some(known)) => {
                        debug!(command = id, state = ?known.state, "command handed out again; already known");
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        error!(error = %e, command = id, "could not read the store; the command will be handed out again");
                        continue;
                    }
                }
                // Through the interlocks first: refused, or rewritten to carry the plan.
                let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
                let asked = shared
                    .automation
                    .send(AutomationInput::CloudCommand {
                        command: Box::new(record.clone()),
                        reply: reply_tx,
                    })
                    .await;
                let verdict = match (asked, reply_rx.await) {
                    (Ok(()), Ok(verdict)) => verdict,
                    _ => Err("the agent is shutting down".to_string()),
                };
                let (record, refusal) = match verdict {
                    Ok(planned) => (planned, None),
                    Err(reason) => (record, Some(reason)),
                };
                let to_store = record.clone();
                let refused = refusal.clone();
                let accepted = shared
                    .store
                    .call(move |s| {
                        let accepted = s.accept_command(&to_store, now_ms())?;
                        if let (crate::store::Accepted::New, Some(reason)) = (&accepted, refused) {
                            s.finish_command(
                                to_store.id,
                                &CommandOutcome::Failed {
                                    reason,
                                    execution_time_ms: None,
                                },
                                now_ms(),
                            )?;
                        }
                        Ok(accepted)
                    })
                    .await;
                if let Some(reason) = refusal {
                    warn!(command = id, master, %reason, "command refused by the interlocks");
                    shared.outbox_ready.notify_one();
                    continue;
                }
                match accepted {
                    Ok(crate::store::Accepted::New) => {
                        info!(command = record.id, master, command_type = %record.command_type, "command accepted");
                        // A polling master takes its commands from the local API instead.
                        let polls = shared.config.master(master).map(|m| m.transport)
                            == Some(crate::config::Transport::Poll);
                        if !polls {
                            let _ = delivery.send(DeliveryInput::Admit(Box::new(record))).await;
                        }
                    }
                    Ok(crate::store::Accepted::Known(state)) => {
                        debug!(
                            command = record.id,
                            ?state,
                            "command handed out again; already known"
                        );
                    }
                    Err(e) => {
                        error!(error = %e, command = record.id, "could not store the command; it will be handed out again")
                    }
                }
            }
            Err(reason) => {
                warn!(
                    command = row.id,
                    reason, "unusable command from the backend; reporting it failed"
                );
                let id = row.id;
                let payload = json!({"command_id": id, "status": "failed", "error_message": format!("agent cannot run it: {reason}")});
                let _ = shared
                    .store
                    .call(move |s| {
                        s.enqueue(
                            OutboxClass::Completion,
                            &format!("completion:{id}"),
                            &payload,
                            now_ms(),
                        )
                    })
                    .await;
                shared.outbox_ready.notify_one();
            }
        }
    }
}

pub(crate) async fn pull_rules(shared: &Arc<Shared>, master: &str) {
    let key = format!("rules:{master}");
    let key_for_read = key.clone();
    let cursor = shared
        .store
        .call(move |s| s.cursor(&key_for_read))
        .await
        .ok()
        .flatten();
    let since = cursor
        .as_deref()
        .and_then(crate::cloud::parse_timestamp_ms)
        .map(|ms| crate::cloud::format_timestamp_ms(ms - RULE_CURSOR_OVERLAP_MS))
        .unwrap_or_else(|| "-infinity".to_string());
    let mut after: Option<String> = None;
    let mut since_page = since;
    loop {
        let page = match shared
            .cloud
            .rule_changes(master, &since_page, after.as_deref(), RULE_CHANGES_PAGE_MAX)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                note_cloud_result(shared, Err(&e));
                return;
            }
        };
        let Some(last) = page.last() else { return };
        let (last_at, last_id) = (last.changed_at.clone(), last.id.clone());
        let records: Vec<_> = page.iter().map(|c| c.to_record()).collect();
        let full = page.len() as u32 == RULE_CHANGES_PAGE_MAX;
        let key = key.clone();
        let cursor_value = last_at.clone();
        match shared
            .store
            .call(move |s| {
                let changed = s.apply_rule_changes(&records)?;
                s.set_cursor(&key, &cursor_value)?;
                Ok(changed)
            })
            .await
        {
            Ok(changed) if changed > 0 => {
                info!(master, changed, "rules mirror updated");
                let _ = shared.automation.send(AutomationInput::ReloadRules).await;
            }
            Ok(_) => {}
            Err(e) => {
                error!(error = %e, "could not update the rules mirror");
                return;
            }
        }
        if !full {
            return;
        }
        since_page = last_at;
        after = Some(last_id);
    }
}
