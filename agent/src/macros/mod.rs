//! Macros: ordered steps (relay switch, delay, MQTT publish, nested macro), each optionally
//! delayed and guarded by a condition, run one at a time per macro and cancellable.
//!
//! Sans-I/O like the rest of the decision code: [`parse_macro`] reads the backend rows,
//! [`MacroCatalog`] refuses cyclic or too deep nesting, [`MacroRunner`] is a state machine the
//! runtime polls at [`MacroRunner::next_deadline_ms`]; it returns [`MacroEffect`]s, and every
//! `Switch` goes through the interlock arbiter (`crate::safety`) as `Source::Macro`.
//!
//! Backend shapes (`macro_actions` rows, see docs/decisions/0005-interlocks-and-macros.md):
//! - `relay`: `action_payload = {"master_device_id": "...", "slave_mac_address": "AA:BB:CC:DD:EE:FF",
//!   "relay_number": 0..=15, "action": "on"|"off", "duration_seconds": 0..=86400}` (0 = until off;
//!   still capped by the relay's max on-time);
//! - `delay`: nothing but `delay_ms`;
//! - `mqtt_publish`: `action_payload = {"topic": "...", "payload": <any JSON>, "retain": false}`;
//! - `macro`: `action_target` = the nested macro's id.
//!
//! `delay_ms` (0..=3600000) on any step is a wait before that step, counted from when the
//! previous step ran. `condition_check` (opaque JSON, evaluated by the runtime's callback) is
//! checked when the step is due: false skips the step (a `Skipped` effect; for a nested macro step,
//! the whole nested macro), an error stops the run (`Failed`).

mod catalog;
mod parse;
mod runner;

pub use catalog::{MAX_NESTING, MacroCatalog};
pub use parse::{parse_macro, parse_macros};
pub use runner::{MAX_STEPS_PER_RUN, MacroRunner};

use serde::{Deserialize, Serialize};

/// A macro as the runner uses it; `steps` sorted by `sequence`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacroDef {
    pub id: String,
    pub name: String,
    pub enabled: bool,
    pub revision: i64,
    pub steps: Vec<MacroStep>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepKind {
    Relay {
        master: String,
        /// Upper case.
        slave_mac: String,
        relay: u8,
        on: bool,
        /// 0 = until switched off; always 0 for an off.
        duration_s: u32,
    },
    Delay,
    MqttPublish {
        topic: String,
        payload: serde_json::Value,
        retain: bool,
    },
    Macro {
        macro_id: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacroStep {
    pub sequence: i32,
    /// Wait before this step.
    pub delay_ms: u32,
    /// Opaque rule condition; `None` = always run.
    pub condition: Option<serde_json::Value>,
    pub kind: StepKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "reason", rename_all = "snake_case")]
pub enum MacroOutcome {
    Completed,
    Cancelled,
    Failed(String),
}

/// What the runtime must do (or record) for a run. `macro_id` is always the macro that was
/// started (the one to cancel or abort), also for steps of a macro nested in it; `sequence` is
/// the step's own sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum MacroEffect {
    Switch {
        macro_id: String,
        run_id: u64,
        sequence: i32,
        master: String,
        slave_mac: String,
        relay: u8,
        on: bool,
        duration_s: u32,
    },
    Publish {
        macro_id: String,
        run_id: u64,
        topic: String,
        payload: serde_json::Value,
        retain: bool,
    },
    Skipped {
        macro_id: String,
        run_id: u64,
        sequence: i32,
        why: String,
    },
    Finished {
        macro_id: String,
        run_id: u64,
        outcome: MacroOutcome,
    },
}

impl MacroEffect {
    /// The arbiter request for a `Switch` effect (None for the other effects).
    pub fn switch_request(&self, priority: i32) -> Option<crate::safety::SwitchRequest> {
        use crate::safety::{Source, Switch, SwitchRequest};
        match self {
            MacroEffect::Switch {
                master,
                slave_mac,
                relay,
                on,
                duration_s,
                ..
            } => Some(SwitchRequest {
                source: Source::Macro,
                priority,
                master: master.clone(),
                slave_mac: slave_mac.clone(),
                switches: vec![(
                    *relay,
                    if *on {
                        Switch::On {
                            duration_s: *duration_s,
                        }
                    } else {
                        Switch::Off
                    },
                )],
            }),
            _ => None,
        }
    }
}

fn seq_suffix(sequence: &Option<i64>) -> String {
    match sequence {
        Some(s) => format!(" (sequence {s})"),
        None => String::new(),
    }
}

/// Why a macro could not be parsed, accepted or started; messages name the step or the path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MacroError {
    #[error("macro row is not a JSON object")]
    NotAnObject,
    #[error("macro row: {field}: {reason}")]
    BadField { field: &'static str, reason: String },
    /// `index` is 1-based, in sequence order (in array order when the sequence itself is bad).
    #[error("step {index}{}: {reason}", seq_suffix(.sequence))]
    BadStep {
        index: usize,
        sequence: Option<i64>,
        reason: String,
    },
    #[error("macro '{0}' is defined twice")]
    Duplicate(String),
    #[error("macro cycle: {}", .path.join(" -> "))]
    Cycle { path: Vec<String> },
    #[error("step sequence {sequence} nests unknown macro '{nested}'")]
    UnknownNested { sequence: i32, nested: String },
    #[error("nesting deeper than 8 levels: {}", .path.join(" -> "))]
    TooDeep { path: Vec<String> },
    #[error("nested macro '{nested}' is refused: {reason}")]
    NestedRefused { nested: String, reason: String },
    #[error("unknown macro '{0}'")]
    Unknown(String),
    #[error("macro '{0}' is disabled")]
    Disabled(String),
    #[error("macro '{macro_id}' is already running (run {run_id})")]
    AlreadyRunning { macro_id: String, run_id: u64 },
    #[error("macro '{macro_id}' is refused: {reason}")]
    Refused { macro_id: String, reason: String },
}

#[cfg(test)]
mod tests;
