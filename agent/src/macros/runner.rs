//! Runs started macros step by step; the runtime polls it at its next deadline.

use super::{MacroCatalog, MacroEffect, MacroError, MacroOutcome, MacroStep, StepKind};
use std::collections::BTreeMap;

/// A run that executes more steps than this (nested macros repeated many times) fails.
pub const MAX_STEPS_PER_RUN: u32 = 10_000;

#[derive(Clone, Debug)]
struct Frame {
    macro_id: String,
    next: usize,
}

#[derive(Clone, Debug)]
struct Run {
    run_id: u64,
    requested_by: String,
    started_ms: i64,
    /// The started macro and every macro nested in it, as they were at start: an edit during
    /// the run does not change what the run does (disabling or removing the started macro
    /// stops it).
    defs: BTreeMap<String, Vec<MacroStep>>,
    frames: Vec<Frame>,
    /// When the previous step ran (or the run started): delays count from here.
    last_ms: i64,
    /// When the current step is due; None = not computed yet (poll now).
    due_ms: Option<i64>,
    steps_done: u32,
}

/// The running macros, one run at a time per macro id.
#[derive(Debug, Default)]
pub struct MacroRunner {
    next_run_id: u64,
    runs: BTreeMap<String, Run>,
}

impl MacroRunner {
    pub fn new() -> MacroRunner {
        MacroRunner::default()
    }

    /// Starts `macro_id`; its first step is due at `now_ms` + its delay (poll to run it).
    pub fn start(
        &mut self,
        catalog: &MacroCatalog,
        macro_id: &str,
        requested_by: &str,
        now_ms: i64,
    ) -> Result<u64, MacroError> {
        if let Some(e) = catalog.refused(macro_id) {
            return Err(MacroError::Refused {
                macro_id: macro_id.to_string(),
                reason: e.to_string(),
            });
        }
        let def = catalog
            .get(macro_id)
            .ok_or_else(|| MacroError::Unknown(macro_id.to_string()))?;
        if !def.enabled {
            return Err(MacroError::Disabled(macro_id.to_string()));
        }
        if let Some(run) = self.runs.get(macro_id) {
            return Err(MacroError::AlreadyRunning {
                macro_id: macro_id.to_string(),
                run_id: run.run_id,
            });
        }
        // Snapshot every macro the run may enter; a disabled nested macro refuses the start
        // (skipping part of a sequence, e.g. "open the valve" before "start the pump", is unsafe).
        let mut defs = BTreeMap::new();
        let mut todo = vec![macro_id.to_string()];
        while let Some(id) = todo.pop() {
            if defs.contains_key(&id) {
                continue;
            }
            let refuse = |reason: String| MacroError::Refused {
                macro_id: macro_id.to_string(),
                reason,
            };
            let d = catalog
                .get(&id)
                .ok_or_else(|| refuse(format!("nested macro '{id}' is unknown")))?;
            if !d.enabled {
                return Err(refuse(format!("nested macro '{id}' is disabled")));
            }
            for s in &d.steps {
                if let StepKind::Macro { macro_id } = &s.kind {
                    todo.push(macro_id.clone());
                }
            }
            defs.insert(id, d.steps.clone());
        }
        self.next_run_id += 1;
        let run_id = self.next_run_id;
        tracing::info!(macro_id, run_id, requested_by, "macro started");
        self.runs.insert(
            macro_id.to_string(),
            Run {
                run_id,
                requested_by: requested_by.to_string(),
                started_ms: now_ms,
                defs,
                frames: vec![Frame {
                    macro_id: macro_id.to_string(),
                    next: 0,
                }],
                last_ms: now_ms,
                due_ms: None,
                steps_done: 0,
            },
        );
        Ok(run_id)
    }

    /// Stops a run before its next step (steps already done are not undone).
    pub fn cancel(&mut self, macro_id: &str, now_ms: i64) -> Option<MacroEffect> {
        let run = self.runs.remove(macro_id)?;
        tracing::info!(macro_id, run_id = run.run_id, now_ms, "macro cancelled");
        Some(MacroEffect::Finished {
            macro_id: macro_id.to_string(),
            run_id: run.run_id,
            outcome: MacroOutcome::Cancelled,
        })
    }

    /// The runtime could not perform a step (e.g. refused by the interlocks): the run stops.
    pub fn abort(&mut self, macro_id: &str, reason: &str) -> Option<MacroEffect> {
        let run = self.runs.remove(macro_id)?;
        Some(MacroEffect::Finished {
            macro_id: macro_id.to_string(),
            run_id: run.run_id,
            outcome: MacroOutcome::Failed(reason.to_string()),
        })
    }

    /// Runs every step that is due, in order. A run pauses right after each `Switch` (its next
    /// step, even with no delay, comes at the next poll, and [`MacroRunner::next_deadline_ms`]
    /// says so): the runtime sends the switch first and, if the interlocks refuse it, calls
    /// [`MacroRunner::abort`] before anything after it is emitted.
    pub fn poll(
        &mut self,
        catalog: &MacroCatalog,
        now_ms: i64,
        check: &mut dyn FnMut(&serde_json::Value) -> Result<bool, String>,
    ) -> Vec<MacroEffect> {
        let mut effects = Vec::new();
        let ids: Vec<String> = self.runs.keys().cloned().collect();
        for id in ids {
            let still_enabled = catalog.get(&id).is_some_and(|d| d.enabled);
            let outcome = if still_enabled {
                match self.runs.get_mut(&id) {
                    Some(run) => step_run(&id, run, now_ms, check, &mut effects),
                    None => None,
                }
            } else {
                Some(MacroOutcome::Failed(
                    "macro was disabled or removed while running".into(),
                ))
            };
            if let Some(outcome) = outcome
                && let Some(run) = self.runs.remove(&id)
            {
                tracing::info!(macro_id = %id, run_id = run.run_id, ?outcome, "macro finished");
                effects.push(MacroEffect::Finished {
                    macro_id: id,
                    run_id: run.run_id,
                    outcome,
                });
            }
        }
        effects
    }

    /// When [`MacroRunner::poll`] next has something to do (may be now or past).
    pub fn next_deadline_ms(&self) -> Option<i64> {
        self.runs
            .values()
            .map(|r| r.due_ms.unwrap_or(r.last_ms))
            .min()
    }

    /// Running macros and their run ids.
    pub fn running(&self) -> Vec<(String, u64)> {
        self.runs
            .iter()
            .map(|(id, r)| (id.clone(), r.run_id))
            .collect()
    }

    /// Running macros and how many steps each run has done.
    pub fn steps_done(&self) -> Vec<(String, u32)> {
        self.runs
            .iter()
            .map(|(id, r)| (id.clone(), r.steps_done))
            .collect()
    }

    /// Who started a running macro, and when.
    pub fn started_by(&self, macro_id: &str) -> Option<(&str, i64)> {
        self.runs
            .get(macro_id)
            .map(|r| (r.requested_by.as_str(), r.started_ms))
    }
}

/// Advances one run as far as `now_ms` allows; `Some(outcome)` when it ended.
fn step_run(
    id: &str,
    run: &mut Run,
    now_ms: i64,
    check: &mut dyn FnMut(&serde_json::Value) -> Result<bool, String>,
    effects: &mut Vec<MacroEffect>,
) -> Option<MacroOutcome> {
    loop {
        let Some(frame) = run.frames.last() else {
            return Some(MacroOutcome::Completed);
        };
        let Some(steps) = run.defs.get(&frame.macro_id) else {
            return Some(MacroOutcome::Failed(format!(
                "nested macro '{}' missing",
                frame.macro_id
            )));
        };
        let Some(step) = steps.get(frame.next).cloned() else {
            run.frames.pop();
            if run.frames.is_empty() {
                return Some(MacroOutcome::Completed);
            }
            continue;
        };
        let in_nested = (run.frames.len() > 1).then(|| frame.macro_id.clone());
        let due = *run
            .due_ms
            .get_or_insert(run.last_ms.saturating_add(i64::from(step.delay_ms)));
        if due > now_ms {
            return None;
        }
        run.steps_done += 1;
        if run.steps_done > MAX_STEPS_PER_RUN {
            return Some(MacroOutcome::Failed(format!(
                "more than {MAX_STEPS_PER_RUN} steps"
            )));
        }
        run.last_ms = now_ms;
        run.due_ms = None;
        if let Some(f) = run.frames.last_mut() {
            f.next += 1;
        }
        let where_ = match &in_nested {
            Some(m) => format!("nested macro '{m}' step sequence {}", step.sequence),
            None => format!("step sequence {}", step.sequence),
        };
        if let Some(cond) = &step.condition {
            match check(cond) {
                Ok(true) => {}
                Ok(false) => {
                    let what = match &step.kind {
                        StepKind::Macro { macro_id } => {
                            format!(" (nested macro '{macro_id}' not run)")
                        }
                        _ => String::new(),
                    };
                    effects.push(MacroEffect::Skipped {
                        macro_id: id.to_string(),
                        run_id: run.run_id,
                        sequence: step.sequence,
                        why: format!("{where_}: condition is false{what}"),
                    });
                    continue;
                }
                Err(e) => {
                    return Some(MacroOutcome::Failed(format!(
                        "{where_}: condition could not be evaluated: {e}"
                    )));
                }
            }
        }
        match step.kind {
            StepKind::Relay {
                master,
                slave_mac,
                relay,
                on,
                duration_s,
            } => {
                effects.push(MacroEffect::Switch {
                    macro_id: id.to_string(),
                    run_id: run.run_id,
                    sequence: step.sequence,
                    master,
                    slave_mac,
                    relay,
                    on,
                    duration_s,
                });
                // Pause: the runtime must be able to abort before the next step.
                return None;
            }
            StepKind::Delay => {}
            StepKind::MqttPublish {
                topic,
                payload,
                retain,
            } => effects.push(MacroEffect::Publish {
                macro_id: id.to_string(),
                run_id: run.run_id,
                topic,
                payload,
                retain,
            }),
            StepKind::Macro { macro_id } => {
                if !run.defs.contains_key(&macro_id) {
                    return Some(MacroOutcome::Failed(format!(
                        "{where_}: nested macro '{macro_id}' missing"
                    )));
                }
                run.frames.push(Frame { macro_id, next: 0 });
            }
        }
    }
}
