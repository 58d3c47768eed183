//! The tokio task around [`Automation`]: takes firings from the engine task and requests from
//! the rest of the agent, persists each decision in one transaction, then signs and publishes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::QoS;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{Automation, LatchSource, Step};
use crate::bridge;
use crate::cloud::SystemStatusRow;
use crate::rules::compile::Catalog;
use crate::rules::{Clock, Engine};
use crate::safety::RelayRef;
use crate::shared::{DeliveryInput, Shared, now_ms};
use crate::store::{CommandRecord, Reading};

/// Requests to the automation task.
#[derive(Debug)]
pub enum AutomationInput {
    /// A slave's relay states as it reported them.
    Observe {
        master: String,
        slave_mac: String,
        states: Vec<bool>,
    },
    /// A command from the cloud, through the interlocks before it is accepted.
    CloudCommand {
        command: Box<CommandRecord>,
        reply: oneshot::Sender<Result<CommandRecord, String>>,
    },
    /// A command the Pi created ended (`failure`: why it failed).
    CommandEnded {
        id: i64,
        failure: Option<String>,
    },
    Stop {
        reason: String,
        by: String,
        source: LatchSource,
        reply: Option<oneshot::Sender<bool>>,
    },
    Reset {
        by: String,
        source: LatchSource,
        reply: Option<oneshot::Sender<bool>>,
    },
    CloudLatch(SystemStatusRow),
    /// The rules mirror changed.
    ReloadRules,
    /// The macros as the cloud holds them now.
    Macros(Vec<Value>),
    StartMacro {
        id: String,
        by: String,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    CancelMacro {
        id: String,
        reply: oneshot::Sender<bool>,
    },
    Press {
        relay: RelayRef,
        max_seconds: u32,
        by: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Release {
        relay: RelayRef,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Relays of one slave switched from the operator console.
    Switch {
        master: String,
        slave_mac: String,
        switches: Vec<(u8, crate::safety::Switch)>,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// Readings evaluated in one step at most: those already queued when one arrives are
/// evaluated with it, so that their firings and states share the step's one commit.
const READINGS_PER_STEP_MAX: usize = 256;

/// The automation task owns the rule engine too: a reading is evaluated where its firing is
/// decided and written, with no task hand-off between the engine and the executor.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut automation: Automation,
    mut engine: Engine,
    clock: Clock,
    mut input: mpsc::Receiver<AutomationInput>,
    mut engine_in: mpsc::Receiver<Reading>,
    delivery: mpsc::Sender<DeliveryInput>,
    cancel: CancellationToken,
) {
    loop {
        publish_status(&shared, &automation);
        let wait = automation
            .next_deadline_ms()
            .map(|d| Duration::from_millis((d - now_ms()).clamp(0, 1_000) as u64))
            .unwrap_or(Duration::from_secs(1));
        let engine_deadline = engine.next_deadline_ms();
        let step = tokio::select! {
            _ = cancel.cancelled() => return,
            first = engine_in.recv() => {
                let Some(first) = first else { return };
                let began = std::time::Instant::now();
                let mut firings = Vec::new();
                let mut inputs = 0;
                let mut next = Some(first);
                while let Some(reading) = next.take() {
                    inputs += 1;
                    firings.extend(engine.on_reading(&reading, clock.now_ms()));
                    if inputs < READINGS_PER_STEP_MAX {
                        next = engine_in.try_recv().ok();
                    }
                }
                let states = encode_states(engine.take_dirty());
                if firings.is_empty() {
                    let mut step = Step::default();
                    step.write.rule_states = states;
                    step
                } else {
                    let step = automation.on_firings(firings, states, now_ms());
                    if !perform(&shared, step, &mut engine, &clock, &delivery).await {
                        automation.step_not_written();
                    }
                    shared.metrics.rule_firing_seconds.observe(began.elapsed().as_secs_f64());
                    continue;
                }
            }
            () = tokio::time::sleep_until(clock.instant_at(engine_deadline.unwrap_or(i64::MAX))), if engine_deadline.is_some() => {
                let firings = engine.on_tick(clock.now_ms());
                let states = encode_states(engine.take_dirty());
                automation.on_firings(firings, states, now_ms())
            }
            request = input.recv() => match request {
                None => return,
                Some(request) => match request {
                    AutomationInput::ReloadRules => {
                        match rules_and_catalog(&shared, &automation).await {
                            Ok((rules, catalog)) => {
                                let loaded = running_rules(&rules);
                                let now = clock.now_ms();
                                let problems = engine.load(&rules, &catalog, &HashMap::new());
                                let contradictions = engine.contradictions().to_vec();
                                record_problems(&shared, &loaded, problems).await;
                                record_contradictions(&shared, contradictions).await;
                                // New windows and schedules take their baseline now.
                                let firings = engine.on_tick(now);
                                let states = encode_states(engine.take_dirty());
                                automation.on_firings(firings, states, now_ms())
                            }
                            Err(e) => {
                                error!(error = %e, "could not read the rules mirror");
                                continue;
                            }
                        }
                    }
                    other => handle(&shared, &mut automation, other),
                },
            },
            _ = tokio::time::sleep(wait) => {
                let stale = shared.config.engine.stale_after_ms as i64;
                automation.tick(now_ms(), &mut |c| {
                    check_condition(c, |d, s| shared.latest_reading(d, s), now_ms(), stale)
                })
            }
        };
        if !perform(&shared, step, &mut engine, &clock, &delivery).await {
            automation.step_not_written();
        }
    }
}

fn encode_states<S: serde::Serialize>(states: Vec<(String, S)>) -> Vec<(String, Value)> {
    states
        .into_iter()
        .filter_map(|(rule, state)| serde_json::to_value(state).ok().map(|v| (rule, v)))
        .collect()
}

fn handle(shared: &Arc<Shared>, automation: &mut Automation, request: AutomationInput) -> Step {
    let now = now_ms();
    match request {
        AutomationInput::Observe {
            master,
            slave_mac,
            states,
        } => automation.observe(&master, &slave_mac, &states, now),
        AutomationInput::CloudCommand { command, reply } => {
            let (result, step) = automation.check_cloud_command(*command, now);
            let _ = reply.send(result);
            step
        }
        AutomationInput::CommandEnded { id, failure } => {
            automation.command_ended(id, failure.as_deref(), now)
        }
        AutomationInput::Stop {
            reason,
            by,
            source,
            reply,
        } => {
            let (newly, step) = automation.emergency_stop(&reason, &by, source, now);
            // Whoever was told "latched" may ask `/emergency` at once: it must agree, before
            // the step's write and publishes are done.
            publish_status(shared, automation);
            if let Some(reply) = reply {
                let _ = reply.send(newly);
            }
            step
        }
        AutomationInput::Reset { by, source, reply } => {
            let (done, step) = automation.emergency_reset(&by, source, now);
            publish_status(shared, automation);
            if let Some(reply) = reply {
                let _ = reply.send(done);
            }
            step
        }
        AutomationInput::CloudLatch(row) => automation.cloud_latch(
            row.emergency_stop,
            row.emergency_reason.as_deref(),
            row.emergency_changed_by.as_deref(),
            row.emergency_changed_at
                .as_deref()
                .and_then(crate::cloud::parse_timestamp_ms),
            now,
        ),
        AutomationInput::Macros(rows) => {
            for (id, problem) in automation.set_macros(&rows) {
                warn!(macro_id = %id, %problem, "macro refused");
            }
            Step::default()
        }
        AutomationInput::StartMacro { id, by, reply } => {
            let stale = shared.config.engine.stale_after_ms as i64;
            let (result, step) = automation.start_macro(&id, &by, now, &mut |c| {
                check_condition(c, |d, s| shared.latest_reading(d, s), now, stale)
            });
            let _ = reply.send(result);
            step
        }
        AutomationInput::CancelMacro { id, reply } => {
            let (cancelled, step) = automation.cancel_macro(&id, now);
            let _ = reply.send(cancelled);
            step
        }
        AutomationInput::Press {
            relay,
            max_seconds,
            by,
            reply,
        } => {
            let (result, step) = automation.press(relay, max_seconds, &by, now);
            let _ = reply.send(result);
            step
        }
        AutomationInput::Release { relay, reply } => {
            let (result, step) = automation.release(&relay, now);
            let _ = reply.send(result);
            step
        }
        AutomationInput::Switch {
            master,
            slave_mac,
            switches,
            reply,
        } => {
            let (result, step) = automation.console_switch(&master, &slave_mac, switches, now);
            let _ = reply.send(result);
            step
        }
        AutomationInput::ReloadRules => Step::default(),
    }
}

/// Persists the step in one transaction, then performs it: sign and publish each command,
/// hand it to delivery to await its ack, publish the rest, block or resume the engine. False
/// when the write failed (nothing was performed).
pub(crate) async fn perform(
    shared: &Arc<Shared>,
    mut step: Step,
    engine: &mut Engine,
    clock: &Clock,
    delivery: &mpsc::Sender<DeliveryInput>,
) -> bool {
    step.write.send_now = step.send.iter().map(|c| c.id).collect();
    let write = std::mem::take(&mut step.write);
    let had_outbox = !write.outbox.is_empty() || !write.commands.is_empty();
    let now = now_ms();
    let began = std::time::Instant::now();
    // Signing counters are taken in the write below; the commands must leave in that order.
    // Held only across the write and the publishes: never while waiting on a channel, since the
    // delivery loop takes it too.
    let in_counter_order = if step.send.is_empty() {
        None
    } else {
        Some(shared.command_order.lock().await)
    };
    // For the console's journal, once the step is on disk.
    let journal: Vec<serde_json::Value> = write.outbox.iter().map(|e| e.payload.clone()).collect();
    let written = if write.is_empty() {
        Ok(Default::default())
    } else {
        // Urgent: ahead of telemetry and sync, committed with whatever else is due.
        let written = shared
            .store
            .call_urgent(move |s| s.write_automation(&write, now))
            .await;
        shared
            .metrics
            .automation_write_seconds
            .observe(began.elapsed().as_secs_f64());
        written
    };
    let counters = match written {
        Ok(c) => {
            if !journal.is_empty()
                && let Ok(mut j) = shared.journal.lock()
            {
                for payload in &journal {
                    j.record(payload, now);
                }
            }
            c
        }
        Err(e) => {
            // Nothing is sent that is not on disk; the relays stay as they are.
            error!(error = %e, "could not record an automation step; nothing sent");
            return false;
        }
    };
    let mut handed_over = Vec::new();
    for mut command in step.send {
        let Some(&counter) = counters.get(&command.id) else {
            continue;
        };
        let Some(key) = shared.key(&command.master_device_id) else {
            warn!(master = %command.master_device_id, "no signing key; the command waits for delivery to fail it");
            handed_over.push(DeliveryInput::Admit(Box::new(command)));
            continue;
        };
        match bridge::signed_command(&command, &key, counter) {
            Ok((topic, bytes)) => {
                if let Err(e) = shared
                    .mqtt()
                    .publish(topic, QoS::AtLeastOnce, false, bytes)
                    .await
                {
                    warn!(command = command.id, error = %e, "publish failed; the ack timeout will resend");
                }
                command.attempts = 1;
                handed_over.push(DeliveryInput::Track(Box::new(command), now));
            }
            Err(reason) => error!(command = command.id, %reason, "cannot encode a command"),
        }
    }
    drop(in_counter_order);
    if let Some(reason) = step.cancel_switching_on.take() {
        let _ = delivery
            .send(DeliveryInput::CancelSwitchingOn(reason))
            .await;
    }
    if let Some(blocked) = step.block_engine {
        engine.set_blocked(blocked, clock.now_ms());
        // A reset restarts held-for timers: those states are on disk before the next step.
        let states = encode_states(engine.take_dirty());
        if !states.is_empty() {
            let write = crate::store::AutomationWrite {
                rule_states: states,
                ..Default::default()
            };
            if let Err(e) = shared
                .store
                .call(move |s| s.write_automation(&write, now))
                .await
            {
                error!(error = %e, "could not record the rules' states after the latch changed");
            }
        }
    }
    for input in handed_over {
        let _ = delivery.send(input).await;
    }
    for (topic, payload, retain) in step.publish {
        if let Err(e) = shared
            .mqtt()
            .publish(topic.clone(), QoS::AtLeastOnce, retain, payload)
            .await
        {
            warn!(%topic, error = %e, "publish failed");
        }
    }
    if had_outbox {
        shared.notify_outbox_soon();
    }
    true
}

/// The rules mirror and what the engine needs to check them (relay counts, macro ids).
pub(crate) async fn rules_and_catalog(
    shared: &Arc<Shared>,
    automation: &Automation,
) -> Result<(Vec<crate::store::RuleRecord>, Catalog), crate::store::StoreError> {
    let macros: HashSet<String> = automation.macro_ids().into_iter().collect();
    shared
        .store
        .call(move |s| {
            let rules = s.all_rules()?;
            let relay_counts = s.relay_counts()?;
            Ok((
                rules,
                Catalog {
                    relay_counts,
                    macros,
                },
            ))
        })
        .await
}

/// The rules the engine is asked to run, with their revisions: (decision_rules.id, revision).
pub(crate) fn running_rules(rules: &[crate::store::RuleRecord]) -> Vec<(String, i64)> {
    rules
        .iter()
        .filter(|r| r.enabled && !r.deleted)
        .map(|r| (r.id.clone(), r.revision))
        .collect()
}

/// Every loaded rule the engine did not complain about has its error cleared; the others get
/// theirs written back (each change once).
pub(crate) async fn record_problems(
    shared: &Arc<Shared>,
    loaded: &[(String, i64)],
    problems: Vec<crate::rules::engine::RuleProblem>,
) {
    let bad: HashMap<String, (i64, String)> = problems
        .into_iter()
        .map(|p| {
            warn!(rule = %p.rule_id, device = %p.device_id, reason = %p.reason, "rule skipped: the engine cannot run it");
            (p.rule, (p.revision, p.reason))
        })
        .collect();
    let loaded = loaded.to_vec();
    let now = now_ms();
    let result = shared
        .store
        .call(move |s| {
            let mut queued = 0;
            for (rule, (revision, reason)) in &bad {
                queued += s.note_rule_problem(rule, *revision, Some(reason), now)? as usize;
            }
            for (rule, revision) in loaded.iter().filter(|(r, _)| !bad.contains_key(r)) {
                queued += s.note_rule_problem(rule, *revision, None, now)? as usize;
            }
            Ok(queued)
        })
        .await;
    match result {
        Ok(n) if n > 0 => shared.notify_outbox_soon(),
        Ok(_) => {}
        Err(e) => error!(error = %e, "could not record rule problems"),
    }
}

async fn record_contradictions(
    shared: &Arc<Shared>,
    found: Vec<crate::rules::contradiction::Contradiction>,
) {
    if found.is_empty() {
        return;
    }
    let agent = shared.config.agent.id.clone();
    let now = now_ms();
    let rows: Vec<crate::store::OutboxEntry> = found
        .iter()
        .map(|c| {
            warn!(a = %c.a, b = %c.b, relay = c.relay_number, reason = %c.reason, "rules contradict each other");
            crate::store::OutboxEntry {
                class: crate::store::OutboxClass::Event,
                idempotency_key: format!("contradiction:{}:{}:{}:{}", c.a, c.b, c.relay_number, c.reason),
                payload: serde_json::json!({
                    "agent_id": agent, "device_id": c.device_id, "event_type": "rule_contradiction",
                    "severity": "warning", "source": "agent",
                    "message": format!("rules {} and {} contradict each other on relay {} of {}: {}",
                                       c.a, c.b, c.relay_number, c.slave_mac_address, c.reason),
                    "payload": {"rules": [c.a, c.b], "slave_mac_address": c.slave_mac_address,
                                "relay_number": c.relay_number},
                    "occurred_at": crate::cloud::format_timestamp_ms(now),
                }),
            }
        })
        .collect();
    let write = crate::store::AutomationWrite {
        outbox: rows,
        ..Default::default()
    };
    match shared
        .store
        .call(move |s| s.write_automation(&write, now))
        .await
    {
        Ok(_) => shared.notify_outbox_soon(),
        Err(e) => error!(error = %e, "could not record contradictions"),
    }
}

/// A macro step's condition: `{"device_id", "sensor", "operator", "value"}` against the latest
/// reading; a stale or missing reading is an error (the run stops rather than guess).
pub fn check_condition(
    condition: &Value,
    latest: impl Fn(&str, &str) -> Option<(f64, i64)>,
    now_ms: i64,
    stale_after_ms: i64,
) -> Result<bool, String> {
    let field = |k: &str| {
        condition[k]
            .as_str()
            .ok_or_else(|| format!("condition needs a string \"{k}\""))
    };
    let device = field("device_id")?;
    let sensor = field("sensor")?;
    let operator = field("operator")?;
    let value = condition["value"]
        .as_f64()
        .ok_or("condition needs a number \"value\"")?;
    let Some((reading, at)) = latest(device, sensor) else {
        return Err(format!("no reading of {sensor} from {device}"));
    };
    if now_ms - at > stale_after_ms {
        return Err(format!(
            "the last reading of {sensor} from {device} is stale"
        ));
    }
    Ok(match operator {
        "<" => reading < value,
        "<=" => reading <= value,
        ">" => reading > value,
        ">=" => reading >= value,
        "==" => reading == value,
        "!=" => reading != value,
        other => return Err(format!("operator {other:?} is not one of < <= > >= == !=")),
    })
}

fn publish_status(shared: &Arc<Shared>, automation: &Automation) {
    let emergency = automation
        .safety()
        .emergency()
        .map(|e| serde_json::json!({"reason": e.reason, "by": e.by, "since_ms": e.since_ms}));
    let relays_on = automation.safety().relays_on().len();
    let macros_running: Vec<String> = automation
        .running_macros()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let mutex_violations = automation.mutex_violations().to_vec();
    let macro_steps_done = automation.macro_steps_done();
    if let Ok(mut status) = shared.automation_status.lock() {
        status.macro_steps_done = macro_steps_done;
        status.emergency = emergency;
        status.relays_on = relays_on;
        status.macros_running = macros_running;
        status.mutex_violations = mutex_violations;
    }
}

#[cfg(test)]
mod tests {
    use super::super::interlocks;
    use super::*;
    use crate::safety::Safety;

    /// The answer to a stop and the status `/emergency` reads agree as soon as the stop is
    /// answered, not only once its write and publishes are done.
    #[tokio::test]
    async fn a_stop_is_in_the_status_before_it_is_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, _readings) =
            crate::testing::shared_state(dir.path(), crate::testing::NOWHERE, "", "");
        let mut automation = Automation::new(
            &shared.config,
            Safety::new(interlocks(&shared.config)),
            0,
            0,
        );
        let (reply, answer) = tokio::sync::oneshot::channel();
        let _step = handle(
            &shared,
            &mut automation,
            AutomationInput::Stop {
                reason: "test".into(),
                by: "tester".into(),
                source: LatchSource::LocalApi,
                reply: Some(reply),
            },
        );
        assert!(answer.await.unwrap(), "the stop latched");
        let status = shared.automation_status.lock().unwrap().clone();
        assert!(status.emergency.is_some(), "the status says latched");
    }
}
