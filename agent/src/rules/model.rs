//! The rule language: what `decision_rules.rule_json` holds.
//!
//! These types are the single definition of the format: serde reads them and schemars derives
//! `schemas/rule_json.schema.json` from them (a test keeps the committed file in step).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most actions one rule may carry (a relay board has 16 relays; macros cover the rest).
pub const MAX_ACTIONS: usize = 32;
/// Deepest nesting of all/any/not the compiler accepts (the root condition is depth 1).
pub const MAX_DEPTH: usize = 8;
/// Longest `duration_seconds` of a relay_on (relay_commands_slave refuses more than a day).
pub const MAX_DURATION_SECONDS: u32 = 86_400;

/// A rule: when `conditions` becomes definitely true, run `actions` in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleJson {
    /// The condition tree.
    pub conditions: Condition,
    /// What to do when the rule fires (1 to 32 actions).
    #[schemars(length(min = 1, max = 32))]
    pub actions: Vec<Action>,
}

/// A condition node. Sensor values come from the rule's own master device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    /// `sensor OP value`, e.g. ph < 6.5.
    SensorCompare {
        /// Sensor key as telemetry reports it (e.g. "ph").
        sensor: String,
        operator: Operator,
        value: f64,
        /// After firing, the comparison must be false by this margin before it may fire again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(range(min = 0.0))]
        hysteresis: Option<f64>,
        /// The comparison must hold continuously this long before it counts as true.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held_for_seconds: Option<u32>,
    },
    /// `sensor OP other_sensor + offset`, e.g. temp_in > temp_out + 2.
    SensorsCompare {
        sensor: String,
        operator: Operator,
        other_sensor: String,
        #[serde(default)]
        offset: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held_for_seconds: Option<u32>,
    },
    /// True when every sub-condition is true.
    All {
        #[schemars(length(min = 1))]
        conditions: Vec<Condition>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held_for_seconds: Option<u32>,
    },
    /// True when at least one sub-condition is true.
    Any {
        #[schemars(length(min = 1))]
        conditions: Vec<Condition>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held_for_seconds: Option<u32>,
    },
    /// Negation (not of unknown stays unknown).
    Not { condition: Box<Condition> },
    /// Local time of day in [from, to); wraps midnight when to < from; from == to is all day.
    TimeWindow {
        /// "HH:MM", 24-hour.
        #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
        from: String,
        /// "HH:MM", 24-hour, exclusive.
        #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
        to: String,
        /// Days on which the window opens (a window wrapping midnight belongs to its opening day).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        days: Option<Vec<Weekday>>,
    },
    /// True once at each occurrence of a cron expression (5 fields, or 6 with seconds first).
    Schedule { cron: String },
}

/// Comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Operator {
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "==")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
}

impl Operator {
    /// The operators as written in rule_json, in the order error messages list them.
    pub const ALL: [(&'static str, Operator); 6] = [
        ("<", Operator::Lt),
        ("<=", Operator::Le),
        (">", Operator::Gt),
        (">=", Operator::Ge),
        ("==", Operator::Eq),
        ("!=", Operator::Ne),
    ];

    pub fn parse(s: &str) -> Option<Operator> {
        Self::ALL.iter().find(|(t, _)| *t == s).map(|(_, op)| *op)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Lt => "<",
            Operator::Le => "<=",
            Operator::Gt => ">",
            Operator::Ge => ">=",
            Operator::Eq => "==",
            Operator::Ne => "!=",
        }
    }

    pub fn apply(self, a: f64, b: f64) -> bool {
        match self {
            Operator::Lt => a < b,
            Operator::Le => a <= b,
            Operator::Gt => a > b,
            Operator::Ge => a >= b,
            Operator::Eq => a == b,
            Operator::Ne => a != b,
        }
    }
}

/// Day of the week as written in `time_window.days`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    /// 0 = Monday, matching jiff's `to_monday_zero_offset`.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Something a rule does when it fires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Switch a slave's relay on, for `duration_seconds` (0 = until switched off).
    RelayOn {
        /// The slave's MAC, upper-case "AA:BB:CC:DD:EE:FF" as relay_commands_slave stores it.
        #[schemars(regex(pattern = r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$"))]
        slave_mac_address: String,
        /// 0..15, relay_commands_slave's range (a slave's own relay count may be lower).
        #[schemars(range(min = 0, max = 15))]
        relay_number: u8,
        /// At most a day, relay_commands_slave's range.
        #[serde(default)]
        #[schemars(range(min = 0, max = MAX_DURATION_SECONDS))]
        duration_seconds: u32,
    },
    /// Switch a slave's relay off.
    RelayOff {
        /// The slave's MAC, upper-case "AA:BB:CC:DD:EE:FF" as relay_commands_slave stores it.
        #[schemars(regex(pattern = r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$"))]
        slave_mac_address: String,
        /// 0..15, relay_commands_slave's range (a slave's own relay count may be lower).
        #[schemars(range(min = 0, max = 15))]
        relay_number: u8,
    },
    /// Run a stored macro.
    Macro { macro_id: String },
    /// Publish an MQTT message.
    MqttPublish {
        topic: String,
        payload: serde_json::Value,
        #[serde(default)]
        retain: bool,
    },
}

/// The `$id` of the committed schema file.
pub const SCHEMA_ID: &str = "https://autocore.dev/schemas/rule_json.schema.json";

/// The JSON Schema of `rule_json`, pretty-printed with a trailing newline (the committed file).
pub fn schema_json() -> String {
    let mut schema = schemars::schema_for!(RuleJson);
    schema.insert("$id".to_owned(), SCHEMA_ID.into());
    schema.insert("title".to_owned(), "AutoCore rule_json".into());
    schema.insert(
        "description".to_owned(),
        "decision_rules.rule_json: a condition tree over one master's sensors and the actions \
         to run when it becomes true. Generated from agent/src/rules/model.rs; do not edit."
            .into(),
    );
    // Serializing a Value cannot fail; fall back to compact output rather than panic.
    let mut text =
        serde_json::to_string_pretty(&schema).unwrap_or_else(|_| schema.as_value().to_string());
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA_PATH: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schemas/rule_json.schema.json"
    );

    #[test]
    fn committed_schema_matches_the_types() {
        let generated = schema_json();
        if std::env::var_os("UPDATE_SCHEMA").is_some() {
            std::fs::write(SCHEMA_PATH, &generated).unwrap();
            return;
        }
        let committed = std::fs::read_to_string(SCHEMA_PATH).unwrap_or_default();
        assert!(
            committed == generated,
            "schemas/rule_json.schema.json is out of date with agent/src/rules/model.rs; regenerate it with\n  \
             UPDATE_SCHEMA=1 cargo test -p autocore-agent --lib rules::model::tests::committed_schema_matches_the_types"
        );
    }

    #[test]
    fn schema_names_every_type_and_operator() {
        let text = schema_json();
        let types = crate::rules::compile::CONDITION_TYPES
            .iter()
            .chain(&crate::rules::compile::ACTION_TYPES);
        for needle in types.copied().chain(["\"<=\"", "\"!=\"", SCHEMA_ID]) {
            assert!(text.contains(needle), "schema lacks {needle}");
        }
    }
}
