//! The automation executor: turns rule firings, macro steps, hold controls, commands from the
//! cloud and emergency stops into relay commands, through the interlock arbiter, whatever their
//! source. `Automation` decides (no I/O: it returns a [`Step`] to persist, then perform);
//! [`task`] drives it.

pub mod task;

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::command::{CommandSource, CommandType, RelayAction, SwitchAction, actions_to_columns};
use crate::config::{AgentConfig, Transport};
use crate::macros::{MacroCatalog, MacroEffect, MacroOutcome, MacroRunner};
use crate::rules::engine::Firing;
use crate::rules::model::Action;
use crate::safety::{Holds, Interlocks, Plan, RelayRef, Safety, Source, Switch, SwitchRequest};
use crate::store::{AutomationWrite, CommandRecord, CommandState, OutboxClass, OutboxEntry};

/// Priority of the arbiter's own offs and of the emergency stop: above every rule.
pub const SAFETY_PRIORITY: i32 = 100;
/// Priority of macro steps.
pub const MACRO_PRIORITY: i32 = 60;
/// Priority of the operator console's switches: a person at the plant, watching, outranks
/// macros ([`MACRO_PRIORITY`]) and rules of ordinary priority (a dashboard command's default is
/// 50), so that a relay a macro or rule switched on can be switched off from the console; a
/// hold (90) and the arbiter's own offs (100) still win.
pub const CONSOLE_PRIORITY: i32 = 80;
/// Mutex violations `/health` lists (the most recent).
pub const MUTEX_VIOLATIONS_KEPT: usize = 10;

/// Who stopped or reset the plant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatchSource {
    LocalApi,
    /// A stop heard on `autocore/emergency/stop`, with its issue time if it said one.
    Mqtt {
        issued_at_ms: Option<u64>,
    },
    Cloud,
}

impl LatchSource {
    fn as_str(self) -> &'static str {
        match self {
            LatchSource::LocalApi => "local API",
            LatchSource::Mqtt { .. } => "MQTT",
            LatchSource::Cloud => "cloud",
        }
    }
}

/// What one decision needs done: written in one transaction first, then performed.
#[derive(Debug, Default)]
pub struct Step {
    pub write: AutomationWrite,
    /// Commands to sign and publish now (masters on MQTT), in order.
    pub send: Vec<CommandRecord>,
    /// MQTT publications after the commands: (topic, payload, retain).
    pub publish: Vec<(String, Vec<u8>, bool)>,
    /// The emergency stop: end every in-flight command that switches something on.
    pub cancel_switching_on: Option<String>,
    /// Block (true) or resume (false) the rule engine.
    pub block_engine: Option<bool>,
}

impl Step {
    fn merge(&mut self, other: Step) {
        self.write.commands.extend(other.write.commands);
        self.write.rule_states.extend(other.write.rule_states);
        if let Some(later) = other.write.safety {
            match &mut self.write.safety {
                Some(delta) => delta.absorb(later),
                None => self.write.safety = Some(later),
            }
        }
        self.write.outbox.extend(other.write.outbox);
        self.write.cursors.extend(other.write.cursors);
        self.send.extend(other.send);
        self.publish.extend(other.publish);
        if other.cancel_switching_on.is_some() {
            self.cancel_switching_on = other.cancel_switching_on;
        }
        if other.block_engine.is_some() {
            self.block_engine = other.block_engine;
        }
    }
}

/// How a command the Pi creates is labelled in `relay_commands_slave`.
#[derive(Debug, Clone)]
struct Origin {
    command_type: CommandType,
    triggered_by: CommandSource,
    rule_id: Option<String>,
    rule_name: Option<String>,
}

impl Origin {
    fn of(source: Source) -> Origin {
        let (command_type, triggered_by) = match source {
            Source::Rule => (CommandType::Rule, CommandSource::Rule),
            Source::Macro => (CommandType::Automation, CommandSource::Macro),
            Source::Hold | Source::Manual | Source::Polling => {
                (CommandType::Manual, CommandSource::Manual)
            }
            Source::Automation | Source::Safety => {
                (CommandType::Automation, CommandSource::Automation)
            }
        };
        Origin {
            command_type,
            triggered_by,
            rule_id: None,
            rule_name: None,
        }
    }
}

/// What a plan sends the slave: one absolute action per relay.
fn plan_actions(plan: &crate::safety::Plan) -> Vec<RelayAction> {
    plan.switches
        .iter()
        .map(|s| RelayAction {
            relay: s.relay,
            action: if s.on {
                SwitchAction::On
            } else {
                SwitchAction::Off
            },
            duration_s: s.duration_s,
        })
        .collect()
}

/// The interlocks as configured.
pub fn interlocks(config: &AgentConfig) -> Interlocks {
    Interlocks {
        mutex_groups: config.safety.mutex_groups.clone(),
        limits: config.safety.limits.clone(),
        default_max_on_seconds: config.safety.default_max_on_seconds,
    }
}

#[derive(Debug)]
pub struct Automation {
    agent_id: String,
    command_ttl_ms: i64,
    transports: HashMap<String, Transport>,
    safety: Safety,
    holds: Holds,
    macros: MacroCatalog,
    runner: MacroRunner,
    /// Which Pi-created command performs which macro step, to stop the run if it fails.
    macro_commands: HashMap<i64, String>,
    last_edge_number: u64,
    /// When the latch last changed here (ms): a cloud row older than that is stale.
    latch_changed_ms: i64,
    /// Observations not yet persisted.
    safety_dirty: bool,
    /// The arbiter's relays as last handed to the store: a step writes what changed.
    persisted: crate::safety::PersistedRelays,
    /// The last [`MUTEX_VIOLATIONS_KEPT`] mutex groups found violated, for `/health`.
    mutex_violations: Vec<crate::safety::MutexViolation>,
}

impl Automation {
    pub fn new(
        config: &AgentConfig,
        safety: Safety,
        last_edge_number: u64,
        latch_changed_ms: i64,
    ) -> Automation {
        Automation {
            agent_id: config.agent.id.clone(),
            command_ttl_ms: config.engine.command_ttl_ms as i64,
            transports: config
                .masters
                .iter()
                .map(|m| (m.device_id.clone(), m.transport))
                .collect(),
            safety,
            holds: Holds::default(),
            macros: MacroCatalog::new(vec![]).0,
            runner: MacroRunner::new(),
            macro_commands: HashMap::new(),
            last_edge_number,
            latch_changed_ms,
            safety_dirty: false,
            persisted: Default::default(),
            mutex_violations: Vec::new(),
        }
    }

    pub fn safety(&self) -> &Safety {
        &self.safety
    }

    pub fn macro_ids(&self) -> Vec<String> {
        self.macros.ids().map(str::to_string).collect()
    }

    /// Whether `id` could start now (known, enabled, not refused, not running).
    fn can_start(&self, id: &str) -> Result<(), String> {
        if let Some(problem) = self.macros.refused(id) {
            return Err(problem.to_string());
        }
        let Some(def) = self.macros.get(id) else {
            return Err("unknown macro".into());
        };
        if !def.enabled {
            return Err("disabled".into());
        }
        if self.runner.running().iter().any(|(m, _)| m == id) {
            return Err("already running".into());
        }
        Ok(())
    }

    pub fn running_macros(&self) -> Vec<(String, u64)> {
        self.runner.running()
    }

    /// Each running macro and the steps its run has done.
    pub fn macro_steps_done(&self) -> Vec<(String, u32)> {
        self.runner.steps_done()
    }

    fn snapshot(&mut self) -> Option<crate::safety::SafetyDelta> {
        self.safety_dirty = false;
        Some(self.persisted.delta(self.safety.snapshot()))
    }

    /// A step's write failed: what is on disk of the arbiter is not known, so the next step
    /// writes all of it.
    pub fn step_not_written(&mut self) {
        self.persisted.forget();
        self.safety_dirty = true;
    }

    /// The command that carries `plan` to its slave, with a fresh edge id.
    fn command_for(
        &mut self,
        plan: &Plan,
        origin: &Origin,
        now_ms: i64,
    ) -> (CommandRecord, String) {
        self.last_edge_number += 1;
        let number = self.last_edge_number;
        let client_id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("autocore-edge-command:{}:{number}", self.agent_id).as_bytes(),
        )
        .to_string();
        let record = CommandRecord {
            id: -(number as i64),
            master_device_id: plan.master.clone(),
            slave_mac_address: plan.slave_mac.clone(),
            slave_device_id: None,
            actions: plan_actions(plan),
            command_type: origin.command_type,
            triggered_by: origin.triggered_by,
            priority: plan.priority.clamp(0, 100),
            rule_id: origin.rule_id.clone(),
            rule_name: origin.rule_name.clone(),
            expires_at_ms: now_ms + self.command_ttl_ms,
            state: CommandState::Accepted,
            attempts: 0,
            last_sent_at_ms: None,
            polled_by: None,
        };
        (record, client_id)
    }

    /// Adds the commands for accepted plans to `step` (sent now over MQTT, or left for a polling
    /// master to collect from the local API).
    fn carry(&mut self, step: &mut Step, plans: &[Plan], origin: &Origin, now_ms: i64) -> Vec<i64> {
        let mut ids = Vec::new();
        for plan in plans {
            if plan.switches.is_empty() {
                continue;
            }
            self.safety.apply(plan, now_ms);
            let (record, client_id) = self.command_for(plan, origin, now_ms);
            ids.push(record.id);
            if self.transports.get(&record.master_device_id) != Some(&Transport::Poll) {
                step.send.push(record.clone());
            }
            step.write.commands.push((record, client_id));
        }
        if !plans.is_empty() {
            step.write.safety = self.snapshot();
        }
        ids
    }

    /// Checks every request of one decision; all pass or none is carried out.
    fn check_all(&self, requests: &[SwitchRequest], now_ms: i64) -> Result<Vec<Plan>, String> {
        requests
            .iter()
            .map(|r| self.safety.check(r, now_ms).map_err(|e| e.to_string()))
            .collect()
    }

    // ------------------------------------------------------------------------ rule firings

    /// Rule firings with the engine's new states, in one step: the states are on disk with the
    /// commands they caused, so a restart neither re-fires a rule nor forgets its command.
    pub fn on_firings(
        &mut self,
        firings: Vec<Firing>,
        states: Vec<(String, Value)>,
        now_ms: i64,
    ) -> Step {
        let mut step = Step::default();
        step.write.rule_states = states;
        for firing in firings {
            let part = self.on_firing(&firing, now_ms);
            step.merge(part);
        }
        step
    }

    fn on_firing(&mut self, firing: &Firing, now_ms: i64) -> Step {
        let mut step = Step::default();
        let mut requests: Vec<SwitchRequest> = Vec::new();
        let mut describe: Vec<String> = Vec::new();
        for action in &firing.actions {
            let (slave, relay, switch) = match action {
                Action::RelayOn {
                    slave_mac_address,
                    relay_number,
                    duration_seconds,
                } => (
                    slave_mac_address,
                    *relay_number,
                    Switch::On {
                        duration_s: *duration_seconds,
                    },
                ),
                Action::RelayOff {
                    slave_mac_address,
                    relay_number,
                } => (slave_mac_address, *relay_number, Switch::Off),
                _ => continue,
            };
            let slave = slave.to_ascii_uppercase();
            match requests
                .iter_mut()
                .find(|r| r.slave_mac == slave && r.master == firing.device_id)
            {
                Some(r) => r.switches.push((relay, switch)),
                None => requests.push(SwitchRequest {
                    source: Source::Rule,
                    priority: firing.priority,
                    master: firing.device_id.clone(),
                    slave_mac: slave,
                    switches: vec![(relay, switch)],
                }),
            }
        }
        let mut origin = Origin::of(Source::Rule);
        origin.rule_id = Some(firing.rule_id.clone());
        origin.rule_name = Some(firing.rule_name.clone());
        let checked = self.check_all(&requests, now_ms);
        // A macro that cannot start refuses the firing too: never half of a rule's actions.
        let macro_ids: Vec<&String> = firing
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Macro { macro_id } => Some(macro_id),
                _ => None,
            })
            .collect();
        let checked = checked.and_then(|plans| {
            for id in &macro_ids {
                self.can_start(id).map_err(|e| format!("macro {id}: {e}"))?;
            }
            Ok(plans)
        });
        let result = match checked {
            Ok(plans) => {
                for plan in &plans {
                    describe.push(plan.summary());
                }
                self.carry(&mut step, &plans, &origin, now_ms);
                for id in &macro_ids {
                    match self.runner.start(
                        &self.macros,
                        id,
                        &format!("rule {}", firing.rule_id),
                        now_ms,
                    ) {
                        Ok(run) => describe.push(format!("macro {id} started (run {run})")),
                        Err(e) => describe.push(format!("macro {id} not started: {e}")),
                    }
                }
                for action in &firing.actions {
                    if let Action::MqttPublish {
                        topic,
                        payload,
                        retain,
                    } = action
                    {
                        step.publish.push((
                            topic.clone(),
                            payload.to_string().into_bytes(),
                            *retain,
                        ));
                        describe.push(format!("published to {topic}"));
                    }
                }
                "executed"
            }
            Err(reason) => {
                describe.push(format!("refused: {reason}"));
                "refused"
            }
        };
        if describe.is_empty() {
            describe.push("no actions".into());
        }
        let explanation = format!("{}; {}", firing.explanation, describe.join("; "));
        let clients: Vec<String> = step
            .write
            .commands
            .iter()
            .map(|(_, client)| client.clone())
            .collect();
        let client_id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!(
                "autocore-rule-execution:{}:{}:{}",
                self.agent_id, firing.rule, firing.fired_at_ms
            )
            .as_bytes(),
        );
        let readings: Vec<Value> = firing
            .readings
            .iter()
            .map(|r| {
                json!({"sensor": r.sensor, "value": r.value,
                       "recorded_at": crate::cloud::format_timestamp_ms(r.recorded_at_ms)})
            })
            .collect();
        let row = json!({
            "client_id": client_id,
            "agent_id": self.agent_id,
            "device_id": firing.device_id,
            "rule_uuid": firing.rule,
            "rule_id": firing.rule_id,
            "rule_name": firing.rule_name,
            "priority": firing.priority.clamp(0, 100),
            "executed_at": crate::cloud::format_timestamp_ms(firing.fired_at_ms),
            "result": result,
            "explanation": truncate(&explanation, 4000),
            "readings": readings,
            "actions": serde_json::to_value(&firing.actions).unwrap_or(Value::Null),
            "hourly_count": firing.hourly_count,
            "hourly_max": firing.hourly_max,
            "cooldown_seconds": firing.cooldown_seconds,
            "command_client_ids": clients,
        });
        tracing::info!(rule = %firing.rule_id, device = %firing.device_id, result, %explanation, "rule fired");
        step.write.outbox.push(OutboxEntry {
            class: OutboxClass::RuleFeedback,
            idempotency_key: format!("execution:{client_id}"),
            payload: json!({"kind": "execution", "row": row}),
        });
        step
    }

    // ------------------------------------------------------------ commands from the cloud

    /// A command from the cloud (dashboard, or for a polling master) passes the interlocks like
    /// any other: refused with the reason, or rewritten to carry the plan (mutex offs first,
    /// durations capped).
    pub fn check_cloud_command(
        &mut self,
        mut command: CommandRecord,
        now_ms: i64,
    ) -> (Result<CommandRecord, String>, Step) {
        let mut step = Step::default();
        let source = if self.transports.get(&command.master_device_id) == Some(&Transport::Poll) {
            Source::Polling
        } else {
            Source::Manual
        };
        let switches = command
            .actions
            .iter()
            .map(|a| {
                (
                    a.relay,
                    match a.action {
                        SwitchAction::On => Switch::On {
                            duration_s: a.duration_s,
                        },
                        SwitchAction::Off => Switch::Off,
                    },
                )
            })
            .collect();
        let request = SwitchRequest {
            source,
            priority: command.priority,
            master: command.master_device_id.clone(),
            slave_mac: command.slave_mac_address.to_ascii_uppercase(),
            switches,
        };
        match self.safety.check(&request, now_ms) {
            Ok(plan) => {
                self.safety.apply(&plan, now_ms);
                step.write.safety = self.snapshot();
                let requested = std::mem::replace(&mut command.actions, plan_actions(&plan));
                // The dashboard's row stays the record of what was asked (its content is
                // immutable); what the slave is sent instead is recorded beside it.
                if requested != command.actions {
                    step.write.outbox.push(self.event(
                        "command_adjusted",
                        "info",
                        format!(
                            "command {} sent as the interlocks allow: {}",
                            command.id,
                            plan.summary()
                        ),
                        json!({
                            "command_id": command.id,
                            "requested": actions_to_columns(&requested),
                            "sent": actions_to_columns(&command.actions),
                        }),
                        now_ms,
                    ));
                }
                (Ok(command), step)
            }
            Err(refusal) => (
                Err(format!("refused by the Pi's interlocks: {refusal}")),
                step,
            ),
        }
    }

    // ----------------------------------------------------------------- relay truth, timers

    /// What a slave reported. Persisted lazily (with the next step, or within a second): an
    /// observation lost in a crash is made again from the next report. A mutex group it shows
    /// violated is resolved at once (the whole group off, ahead of anything else), recorded as
    /// an event and kept for `/health`.
    pub fn observe(&mut self, master: &str, slave_mac: &str, states: &[bool], now_ms: i64) -> Step {
        let mut step = Step::default();
        let violations =
            self.safety
                .observe(master, &slave_mac.to_ascii_uppercase(), states, now_ms);
        self.safety_dirty = true;
        for (violation, plan) in violations {
            let message = violation.describe();
            tracing::warn!(%message, "mutex group violated");
            self.carry(&mut step, &[plan], &Origin::of(Source::Safety), now_ms);
            step.write.outbox.push(self.event(
                "mutex_violation",
                "warning",
                message,
                serde_json::to_value(&violation).unwrap_or_default(),
                now_ms,
            ));
            if self.mutex_violations.len() >= MUTEX_VIOLATIONS_KEPT {
                self.mutex_violations.remove(0);
            }
            self.mutex_violations.push(violation);
        }
        step
    }

    /// The last mutex groups found violated (and switched off), oldest first.
    pub fn mutex_violations(&self) -> &[crate::safety::MutexViolation] {
        &self.mutex_violations
    }

    /// A command the Pi created ended; a macro whose step failed stops there.
    pub fn command_ended(&mut self, id: i64, failure: Option<&str>, now_ms: i64) -> Step {
        let mut step = Step::default();
        if let (Some(macro_id), Some(reason)) = (self.macro_commands.remove(&id), failure)
            && let Some(effect) = self.runner.abort(&macro_id, reason)
        {
            self.macro_effects(&mut step, vec![effect], now_ms);
        }
        step
    }

    pub fn next_deadline_ms(&self) -> Option<i64> {
        [
            self.safety.next_deadline_ms(),
            self.holds.next_deadline_ms(),
            self.runner.next_deadline_ms(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Time passed: relays past their duration or maximum on-time go off, holds end, macro steps
    /// run.
    pub fn tick(
        &mut self,
        now_ms: i64,
        check: &mut dyn FnMut(&Value) -> Result<bool, String>,
    ) -> Step {
        let mut step = Step::default();
        let offs = self.safety.due(now_ms);
        if !offs.is_empty() {
            self.carry(&mut step, &offs, &Origin::of(Source::Safety), now_ms);
        }
        for request in self.holds.due(now_ms) {
            // A hold's off is allowed whatever holds the relay: it only switches off.
            if let Ok(plan) = self.safety.check(&request, now_ms) {
                self.carry(&mut step, &[plan], &Origin::of(Source::Hold), now_ms);
            }
        }
        let effects = self.runner.poll(&self.macros, now_ms, check);
        self.macro_effects(&mut step, effects, now_ms);
        if step.write.safety.is_none() && (!offs.is_empty() || self.safety_dirty) {
            step.write.safety = self.snapshot();
        }
        step
    }

    fn macro_effects(&mut self, step: &mut Step, effects: Vec<MacroEffect>, now_ms: i64) {
        for effect in effects {
            match effect {
                effect @ MacroEffect::Switch { .. } => {
                    let Some(request) = effect.switch_request(MACRO_PRIORITY) else {
                        continue;
                    };
                    let MacroEffect::Switch {
                        macro_id, sequence, ..
                    } = effect
                    else {
                        continue;
                    };
                    match self.safety.check(&request, now_ms) {
                        Ok(plan) => {
                            let ids = self.carry(step, &[plan], &Origin::of(Source::Macro), now_ms);
                            for id in ids {
                                self.macro_commands.insert(id, macro_id.clone());
                            }
                        }
                        Err(refusal) => {
                            let reason = format!("step {sequence} refused: {refusal}");
                            if let Some(end) = self.runner.abort(&macro_id, &reason) {
                                self.macro_effects(step, vec![end], now_ms);
                            }
                        }
                    }
                }
                MacroEffect::Publish {
                    topic,
                    payload,
                    retain,
                    ..
                } => step
                    .publish
                    .push((topic, payload.to_string().into_bytes(), retain)),
                MacroEffect::Skipped {
                    macro_id,
                    sequence,
                    why,
                    ..
                } => tracing::info!(%macro_id, sequence, %why, "macro step skipped"),
                MacroEffect::Finished {
                    macro_id,
                    run_id,
                    outcome,
                } => {
                    let (severity, text) = match &outcome {
                        MacroOutcome::Completed => ("info", "completed".to_string()),
                        MacroOutcome::Cancelled => ("info", "cancelled".to_string()),
                        MacroOutcome::Failed(reason) => ("warning", format!("failed: {reason}")),
                    };
                    tracing::info!(%macro_id, run_id, outcome = %text, "macro run ended");
                    step.write.outbox.push(self.event(
                        "macro_run",
                        severity,
                        format!("macro {macro_id} run {run_id} {text}"),
                        json!({"macro_id": macro_id, "run_id": run_id}),
                        now_ms,
                    ));
                }
            }
        }
    }

    // ------------------------------------------------------------------- macros, controls

    pub fn set_macros(&mut self, rows: &[Value]) -> Vec<(String, String)> {
        let mut defs = Vec::new();
        let mut problems = Vec::new();
        for row in rows {
            match crate::macros::parse_macro(row) {
                Ok(def) => defs.push(def),
                Err(e) => {
                    problems.push((row["id"].as_str().unwrap_or("?").to_string(), e.to_string()))
                }
            }
        }
        let (catalog, refused) = MacroCatalog::new(defs);
        self.macros = catalog;
        problems.extend(refused.into_iter().map(|(id, e)| (id, e.to_string())));
        problems
    }

    pub fn start_macro(
        &mut self,
        id: &str,
        by: &str,
        now_ms: i64,
        check: &mut dyn FnMut(&Value) -> Result<bool, String>,
    ) -> (Result<u64, String>, Step) {
        let mut step = Step::default();
        if let Some(latch) = self.safety.emergency() {
            return (
                Err(format!("emergency stop is latched ({})", latch.reason)),
                step,
            );
        }
        let run = self
            .runner
            .start(&self.macros, id, by, now_ms)
            .map_err(|e| e.to_string());
        if run.is_ok() {
            let effects = self.runner.poll(&self.macros, now_ms, check);
            self.macro_effects(&mut step, effects, now_ms);
        }
        (run, step)
    }

    pub fn cancel_macro(&mut self, id: &str, now_ms: i64) -> (bool, Step) {
        let mut step = Step::default();
        match self.runner.cancel(id, now_ms) {
            Some(effect) => {
                self.macro_effects(&mut step, vec![effect], now_ms);
                (true, step)
            }
            None => (false, step),
        }
    }

    pub fn press(
        &mut self,
        relay: RelayRef,
        max_s: u32,
        by: &str,
        now_ms: i64,
    ) -> (Result<(), String>, Step) {
        let mut step = Step::default();
        let request = match self.holds.press(relay.clone(), max_s, by, now_ms) {
            Ok(r) => r,
            Err(e) => return (Err(e.to_string()), step),
        };
        match self.safety.check(&request, now_ms) {
            Ok(plan) => {
                self.carry(&mut step, &[plan], &Origin::of(Source::Hold), now_ms);
                (Ok(()), step)
            }
            Err(refusal) => {
                self.holds.cancel(&relay);
                (Err(refusal.to_string()), step)
            }
        }
    }

    /// Relays of one slave switched from the operator console, through the interlocks like
    /// any other request: all or none. The answer is the plan as carried out, or the refusal.
    pub fn console_switch(
        &mut self,
        master: &str,
        slave_mac: &str,
        switches: Vec<(u8, Switch)>,
        now_ms: i64,
    ) -> (Result<String, String>, Step) {
        let mut step = Step::default();
        let request = SwitchRequest {
            source: Source::Manual,
            priority: CONSOLE_PRIORITY,
            master: master.to_string(),
            slave_mac: slave_mac.to_ascii_uppercase(),
            switches,
        };
        match self.safety.check(&request, now_ms) {
            Ok(plan) => {
                let summary = plan.summary();
                self.carry(&mut step, &[plan], &Origin::of(Source::Manual), now_ms);
                (Ok(summary), step)
            }
            Err(refusal) => (Err(refusal.to_string()), step),
        }
    }

    pub fn release(&mut self, relay: &RelayRef, now_ms: i64) -> (Result<(), String>, Step) {
        let mut step = Step::default();
        let Some(request) = self.holds.release(relay, now_ms) else {
            return (Err("that relay is not held".into()), step);
        };
        match self.safety.check(&request, now_ms) {
            Ok(plan) => {
                self.carry(&mut step, &[plan], &Origin::of(Source::Hold), now_ms);
                (Ok(()), step)
            }
            Err(refusal) => (Err(refusal.to_string()), step),
        }
    }

    // ------------------------------------------------------------------ emergency stop

    /// Latches the stop: every relay off on every master (a retained stop they all obey), every
    /// in-flight command that switches on ended, rules and macros blocked, a critical event.
    pub fn emergency_stop(
        &mut self,
        reason: &str,
        by: &str,
        source: LatchSource,
        now_ms: i64,
    ) -> (bool, Step) {
        let mut step = Step::default();
        if let LatchSource::Mqtt { issued_at_ms } = source {
            // Our own stop comes back to us from the broker (and a retained one on every
            // reconnect): one issued before the latch last changed here is not news.
            let old = issued_at_ms.is_some_and(|t| t as i64 <= self.latch_changed_ms);
            if old || self.safety.emergency().is_some() {
                return (false, step);
            }
        }
        let newly = self.safety.emergency_stop(reason, by, now_ms);
        // Published even when already latched (from the API or the cloud): a master that missed
        // the stop hears it. Stamped, so that its echo is recognised.
        let mut stop = firmware_protocol::message::Emergency::new(reason);
        stop.issued_at_ms = Some(now_ms.max(0) as u64);
        if let Ok(bytes) = firmware_protocol::Payload::encode(&stop) {
            step.publish.push((
                firmware_protocol::topic::Topic::EmergencyStop.to_string(),
                bytes,
                true,
            ));
        }
        if !newly {
            return (false, step);
        }
        self.latch_changed_ms = now_ms;
        step.write
            .cursors
            .push(("latch_changed_ms".into(), now_ms.to_string()));
        for (id, _) in self.runner.running() {
            let (_, cancelled) = self.cancel_macro(&id, now_ms);
            step.merge(cancelled);
        }
        self.holds = Holds::default();
        step.cancel_switching_on = Some(format!("emergency stop: {reason}"));
        step.block_engine = Some(true);
        step.write.safety = self.snapshot();
        tracing::error!(
            reason,
            by,
            source = source.as_str(),
            "EMERGENCY STOP latched"
        );
        step.write.outbox.push(self.event(
            "emergency_stop",
            "critical",
            format!("emergency stop by {by} via {}: {reason}", source.as_str()),
            json!({"reason": reason, "by": by, "source": source.as_str()}),
            now_ms,
        ));
        if source != LatchSource::Cloud {
            step.write
                .outbox
                .push(self.latch_row(true, Some(reason), by, now_ms));
        }
        (true, step)
    }

    /// Lifts the latch (nothing switches back on by itself) and tells the masters.
    pub fn emergency_reset(&mut self, by: &str, source: LatchSource, now_ms: i64) -> (bool, Step) {
        let mut step = Step::default();
        if !self.safety.reset(by, now_ms) {
            return (false, step);
        }
        self.latch_changed_ms = now_ms;
        step.write
            .cursors
            .push(("latch_changed_ms".into(), now_ms.to_string()));
        // Clear the retained stop first, so a master reconnecting later does not latch again.
        let stop_topic = firmware_protocol::topic::Topic::EmergencyStop.to_string();
        step.publish.push((stop_topic, Vec::new(), true));
        let mut reset = firmware_protocol::message::Emergency::new(format!("reset by {by}"));
        reset.issued_at_ms = Some(now_ms.max(0) as u64);
        if let Ok(bytes) = firmware_protocol::Payload::encode(&reset) {
            step.publish.push((
                firmware_protocol::topic::Topic::EmergencyReset.to_string(),
                bytes,
                false,
            ));
        }
        step.block_engine = Some(false);
        step.write.safety = self.snapshot();
        tracing::warn!(by, source = source.as_str(), "emergency stop reset");
        step.write.outbox.push(self.event(
            "emergency_reset",
            "warning",
            format!("emergency stop reset by {by} via {}", source.as_str()),
            json!({"by": by, "source": source.as_str()}),
            now_ms,
        ));
        if source != LatchSource::Cloud {
            step.write
                .outbox
                .push(self.latch_row(false, None, by, now_ms));
        }
        (true, step)
    }

    /// The cloud's latch (`system_status`), read on every poll. A change made there after the
    /// last change here wins; an older row is what the outbox has not yet overwritten.
    pub fn cloud_latch(
        &mut self,
        stop: bool,
        reason: Option<&str>,
        by: Option<&str>,
        changed_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Step {
        let newer = changed_at_ms.is_some_and(|t| t > self.latch_changed_ms);
        let latched = self.safety.emergency().is_some();
        let by = by.unwrap_or("dashboard");
        if stop && !latched && newer {
            self.emergency_stop(
                reason.unwrap_or("stopped from the dashboard"),
                by,
                LatchSource::Cloud,
                now_ms,
            )
            .1
        } else if !stop && latched && newer {
            self.emergency_reset(by, LatchSource::Cloud, now_ms).1
        } else {
            Step::default()
        }
    }

    pub fn latch_changed_ms(&self) -> i64 {
        self.latch_changed_ms
    }

    fn latch_row(&self, stop: bool, reason: Option<&str>, by: &str, now_ms: i64) -> OutboxEntry {
        OutboxEntry {
            class: OutboxClass::RuleFeedback,
            idempotency_key: format!("latch:{now_ms}:{stop}"),
            payload: json!({"kind": "system_status", "row": {
                "emergency_stop": stop,
                "emergency_reason": reason,
                "emergency_changed_at": crate::cloud::format_timestamp_ms(now_ms),
                "emergency_changed_by": format!("{by} (agent {})", self.agent_id),
            }}),
        }
    }

    fn event(
        &self,
        event_type: &str,
        severity: &str,
        message: String,
        payload: Value,
        now_ms: i64,
    ) -> OutboxEntry {
        OutboxEntry {
            class: OutboxClass::Event,
            idempotency_key: format!("{event_type}:{now_ms}:{message}"),
            payload: json!({
                "agent_id": self.agent_id, "event_type": event_type, "severity": severity,
                "source": "agent", "message": message, "payload": payload,
                "occurred_at": crate::cloud::format_timestamp_ms(now_ms),
            }),
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests;
