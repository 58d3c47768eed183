//! Pull: what the backend has for this agent, one `sync_agent` call per tick for all its
//! masters (docs/decisions/0021-one-sync-per-agent.md), at the pace `pacing` sets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use firmware_protocol::DeviceId;
use rumqttc::QoS;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::note_cloud_result;
use super::pacing::PollPacing;
use crate::automation::task::AutomationInput;
use crate::cloud::{CloudCommand, RuleChange, SyncAnswer, SyncCounters, SyncRequest};
use crate::metrics::label;
use crate::shared::{DeliveryInput, Shared, now_ms};
use crate::store::{CommandOutcome, OutboxClass};

/// Rule changes the backend returns per master and call (`sync_agent`'s page).
pub const RULE_CHANGES_PAGE_MAX: usize = 500;
/// The rules mirror re-reads this far behind its cursor (see docs/decisions/0001).
pub const RULE_CURSOR_OVERLAP_MS: i64 = 5_000;

pub(crate) async fn poll_loop(
    shared: Arc<Shared>,
    delivery: mpsc::Sender<DeliveryInput>,
    cancel: CancellationToken,
) {
    let cfg = &shared.config.cloud;
    let mut pacing = PollPacing::new(
        Duration::from_millis(cfg.poll_active_interval_ms()),
        Duration::from_millis(cfg.poll_interval_ms),
    );
    let masters: Vec<String> = shared
        .config
        .masters
        .iter()
        .map(|m| m.device_id.clone())
        .collect();
    let mut rules = RuleCursors::load(&shared, &masters).await;
    // Nothing known yet: the first call reads every part.
    let mut counters = SyncCounters::default();
    // The same name until a call is answered: a retry after a lost answer gets what that call
    // locked instead of leaving it locked in the cloud until the lock timeout.
    let mut request_id: Option<String> = None;
    // Whether the last call failed, and whether a failed call since the last answer may have
    // locked something (sent, never answered).
    let (mut failing, mut may_have_locked) = (false, false);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pacing.next_wait()) => {}
        }
        // Completions go out before new locks: a command a master finished while the backend
        // was away would otherwise see its lock time out and be handed out again.
        let completions_waiting = shared
            .store
            .call(|s| s.completions_waiting(now_ms()))
            .await
            .unwrap_or(false);
        let id = request_id
            .get_or_insert_with(|| uuid::Uuid::new_v4().simple().to_string())
            .clone();
        let rule_cursors = rules.for_request();
        let request = SyncRequest {
            counters,
            rule_cursors: &rule_cursors,
            masters: &masters,
            limit_per_master: cfg.lock_batch_max,
            // The first call after a failure locks nothing new: completions the masters finished
            // meanwhile are still backing off, and must reach the cloud before their commands'
            // locks, lapsed during the outage, hand them out again. A retry of a call that may
            // have locked keeps its limits: under the same name it returns what that call
            // locked, and locks nothing new.
            limit_total: if completions_waiting || (failing && !may_have_locked) {
                0
            } else {
                cfg.lock_batch_total
            },
            timeout_seconds: cfg.lock_timeout_seconds,
            request_id: &id,
        };
        let answer = match shared.cloud.sync(&request).await {
            Ok(answer) => {
                note_cloud_result(&shared, Ok(()));
                request_id = None;
                if std::mem::take(&mut failing) {
                    // The backend answers again: what backed off while it was away is due now
                    // (completions first), without waiting for the outage to be declared over.
                    let _ = shared.store.call(|s| s.outbox_due_now()).await;
                    shared.notify_outbox();
                }
                may_have_locked = false;
                answer
            }
            Err(e) => {
                failing = true;
                may_have_locked |= e.may_have_executed();
                note_cloud_result(&shared, Err(&e));
                debug!(error = %e, "could not sync");
                pacing.on_no_answer();
                continue;
            }
        };
        if answer.idle {
            pacing.on_idle();
            continue;
        }
        if answer.carries_work() {
            pacing.on_work();
        } else {
            pacing.on_idle();
        }
        counters = apply_answer(&shared, answer, &mut rules, counters, &delivery, &cancel).await;
    }
}

/// Acts on each part of a sync answer; returns the counters for the next call, with a part
/// that could not be applied left unknown so that the next call reads it again.
async fn apply_answer(
    shared: &Arc<Shared>,
    answer: SyncAnswer,
    rules: &mut RuleCursors,
    previous: SyncCounters,
    delivery: &mpsc::Sender<DeliveryInput>,
    cancel: &CancellationToken,
) -> SyncCounters {
    let mut next = answer.cursor.unwrap_or(previous);
    if let Some(commands) = answer.commands {
        accept_commands(shared, commands, delivery, cancel).await;
    }
    if let Some(changes) = answer.rules
        && !apply_rule_changes(shared, rules, changes).await
    {
        next.rules = None;
    }
    if let Some(Some(row)) = answer.latch {
        let _ = shared
            .automation
            .send(AutomationInput::CloudLatch(row))
            .await;
    }
    if let Some(configs) = answer.configs
        && !deliver_configs(shared, configs).await
    {
        next.configs = None;
    }
    if let Some(macros) = answer.macros
        && !mirror_macros(shared, macros).await
    {
        next.macros = None;
    }
    next
}

/// Where each master's rule changes resume: the stored cursor less the overlap, or, while a
/// master's changes come in full pages, exactly after the last one read.
pub(crate) struct RuleCursors {
    stored: HashMap<String, String>,
    paging: HashMap<String, (String, String)>,
}

impl RuleCursors {
    async fn load(shared: &Arc<Shared>, masters: &[String]) -> RuleCursors {
        let mut stored = HashMap::new();
        for master in masters {
            let key = format!("rules:{master}");
            if let Ok(Some(cursor)) = shared.store.call(move |s| s.cursor(&key)).await {
                stored.insert(master.clone(), cursor);
            }
        }
        RuleCursors {
            stored,
            paging: HashMap::new(),
        }
    }

    /// `(master, since, after_id)` for each master with a cursor.
    fn for_request(&self) -> Vec<(String, String, Option<String>)> {
        let mut cursors: Vec<_> = self
            .stored
            .iter()
            .filter(|(master, _)| !self.paging.contains_key(*master))
            .filter_map(|(master, at)| {
                let ms = crate::cloud::parse_timestamp_ms(at)?;
                Some((
                    master.clone(),
                    crate::cloud::format_timestamp_ms(ms - RULE_CURSOR_OVERLAP_MS),
                    None,
                ))
            })
            .collect();
        cursors.extend(
            self.paging
                .iter()
                .map(|(master, (at, id))| (master.clone(), at.clone(), Some(id.clone()))),
        );
        cursors
    }

    /// After a master's page: a full one continues right after its last change, and every
    /// page moves the stored cursor to its last change.
    fn after_page(&mut self, master: &str, last_at: &str, last_id: &str, full: bool) {
        self.stored.insert(master.to_string(), last_at.to_string());
        if full {
            self.paging.insert(
                master.to_string(),
                (last_at.to_string(), last_id.to_string()),
            );
        } else {
            self.paging.remove(master);
        }
    }
}

/// Applies rule changes (the backend orders them by master, then change); false if the store
/// refused them.
async fn apply_rule_changes(
    shared: &Arc<Shared>,
    cursors: &mut RuleCursors,
    changes: Vec<RuleChange>,
) -> bool {
    // The last change and the count per master, for the cursors.
    let mut per_master: HashMap<String, (String, String, usize)> = HashMap::new();
    for change in &changes {
        let entry = per_master
            .entry(change.device_id.clone())
            .or_insert_with(|| (String::new(), String::new(), 0));
        entry.0.clone_from(&change.changed_at);
        entry.1.clone_from(&change.id);
        entry.2 += 1;
    }
    // A master whose page came back empty has caught up.
    let caught_up: Vec<String> = cursors
        .paging
        .keys()
        .filter(|m| !per_master.contains_key(*m))
        .cloned()
        .collect();
    for master in caught_up {
        cursors.paging.remove(&master);
    }
    if changes.is_empty() {
        return true;
    }
    let records: Vec<_> = changes.iter().map(|c| c.to_record()).collect();
    let stored: Vec<(String, String)> = per_master
        .iter()
        .map(|(master, (at, _, _))| (format!("rules:{master}"), at.clone()))
        .collect();
    match shared
        .store
        .call(move |s| {
            let changed = s.apply_rule_changes(&records)?;
            for (key, at) in &stored {
                s.set_cursor(key, at)?;
            }
            Ok(changed)
        })
        .await
    {
        Ok(changed) => {
            for (master, (at, id, count)) in &per_master {
                cursors.after_page(master, at, id, *count >= RULE_CHANGES_PAGE_MAX);
            }
            if changed > 0 {
                info!(changed, "rules mirror updated");
                let _ = shared.automation.send(AutomationInput::ReloadRules).await;
            }
            true
        }
        Err(e) => {
            error!(error = %e, "could not update the rules mirror");
            false
        }
    }
}

/// The macros this agent runs, mirrored so they run offline too.
/// False if the store refused them.
async fn mirror_macros(shared: &Arc<Shared>, rows: Vec<serde_json::Value>) -> bool {
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
        return false;
    }
    let _ = shared.automation.send(AutomationInput::Macros(rows)).await;
    true
}

/// Publishes a master's configuration (retained, so the broker hands it to the master whenever
/// it reconnects) each time its version moves in the cloud. False if one is to be tried again.
async fn deliver_configs(shared: &Arc<Shared>, rows: Vec<crate::cloud::DeviceConfigRow>) -> bool {
    let mut all_done = true;
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
                    all_done = false;
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
    all_done
}

/// Commands the backend locked for this agent: each through the interlocks, into the store,
/// then to delivery (or, for a master that polls, to the local API). A shutdown stops it
/// between commands: those not taken yet stay locked in the cloud until the lock times out, as
/// after a crash.
async fn accept_commands(
    shared: &Arc<Shared>,
    rows: Vec<CloudCommand>,
    delivery: &mpsc::Sender<DeliveryInput>,
    cancel: &CancellationToken,
) {
    for row in rows {
        if cancel.is_cancelled() {
            return;
        }
        match row.to_record() {
            Ok(record) => {
                let id = record.id;
                let master = record.master_device_id.clone();
                let master = master.as_str();
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
                    shared.notify_outbox();
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
                shared.notify_outbox();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_cursors_overlap_when_caught_up_and_resume_exactly_while_paging() {
        let mut cursors = RuleCursors {
            stored: HashMap::new(),
            paging: HashMap::new(),
        };
        assert!(
            cursors.for_request().is_empty(),
            "no cursor: from the beginning"
        );
        cursors.after_page("M1", "2026-12-03T10:00:10Z", "id-1", false);
        assert_eq!(
            cursors.for_request(),
            vec![("M1".into(), "2026-12-03T10:00:05Z".into(), None)],
            "caught up: the stored cursor less the overlap, no id"
        );
        cursors.after_page("M1", "2026-12-03T10:00:20Z", "id-2", true);
        assert_eq!(
            cursors.for_request(),
            vec![(
                "M1".into(),
                "2026-12-03T10:00:20Z".into(),
                Some("id-2".into())
            )],
            "a full page: exactly after its last change"
        );
        cursors.after_page("M1", "2026-12-03T10:00:30Z", "id-3", false);
        assert_eq!(
            cursors.for_request(),
            vec![("M1".into(), "2026-12-03T10:00:25Z".into(), None)],
            "caught up again"
        );
    }
}
