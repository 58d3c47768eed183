//! Why a rule cannot run. `Display` is the short reason the dashboard shows in
//! `decision_rules.last_error`, so every variant names the place in rule_json.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Error)]
pub enum RuleError {
    #[error("rule_json is null")]
    Null,
    #[error("unknown condition type \"{ty}\" at {at}")]
    UnknownConditionType { ty: String, at: String },
    #[error("unknown action type \"{ty}\" at {at}")]
    UnknownActionType { ty: String, at: String },
    #[error("operator \"{op}\" not one of < <= > >= == != at {at}")]
    BadOperator { op: String, at: String },
    #[error("relay {relay} but slave {mac} has {count} relays at {at}")]
    RelayOutOfRange {
        relay: u8,
        mac: String,
        count: u8,
        at: String,
    },
    #[error("bad MAC address \"{mac}\" at {at} (expected AA:BB:CC:DD:EE:FF)")]
    BadMac { mac: String, at: String },
    #[error("unknown macro \"{id}\" at {at}")]
    UnknownMacro { id: String, at: String },
    #[error("cron \"{cron}\" does not parse at {at}: {reason}")]
    BadCron {
        cron: String,
        at: String,
        reason: String,
    },
    #[error("time \"{time}\" is not HH:MM at {at}")]
    BadTime { time: String, at: String },
    #[error("empty {kind} at {at}")]
    EmptyGroup { kind: &'static str, at: String },
    #[error("value is not a finite number at {at}")]
    NonFinite { at: String },
    #[error("hysteresis {hysteresis} is negative at {at}")]
    NegativeHysteresis { hysteresis: f64, at: String },
    #[error("nesting deeper than {max} at {at}")]
    TooDeep { max: usize, at: String },
    #[error("{count} actions at actions; 1 to {max} allowed")]
    ActionCount { count: usize, max: usize },
    #[error("empty {field} at {at}")]
    EmptyName { field: &'static str, at: String },
    /// Anything serde reports (missing or unknown field, wrong JSON type), with its place.
    #[error("{reason} at {at}")]
    Invalid { reason: String, at: String },
}
