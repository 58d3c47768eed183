//! From a mirrored `RuleRecord` to a `CompiledRule` the engine can run, or a `RuleError`
//! naming what is wrong and where.
//!
//! The JSON tree is walked by hand before serde sees it: serde buffers internally tagged
//! enums, which loses the path inside them, and the dashboard needs the path.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::cron::CronSchedule;
use super::error::RuleError;
use super::model::{
    Action, Condition, MAX_ACTIONS, MAX_DEPTH, MAX_DURATION_SECONDS, Operator, RuleJson, Weekday,
};
use crate::store::RuleRecord;

/// Relays a slave has when the catalog does not know it.
pub const DEFAULT_RELAY_COUNT: u8 = 16;

/// What the rules may refer to: the slaves' relay counts and the macros that exist.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    /// (master device id, slave MAC as in the device table) -> relay count.
    pub relay_counts: HashMap<(String, String), u8>,
    pub macros: HashSet<String>,
}

impl Catalog {
    fn relay_count(&self, master: &str, mac: &str) -> u8 {
        self.relay_counts
            .iter()
            .find(|((m, s), _)| m == master && s.eq_ignore_ascii_case(mac))
            .map_or(DEFAULT_RELAY_COUNT, |(_, n)| *n)
    }
}

/// A rule ready to run: the record's settings plus the checked condition tree.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledRule {
    /// decision_rules.id.
    pub uuid: String,
    pub rule_id: String,
    /// rule_name, or rule_id when there is none.
    pub rule_name: String,
    pub device_id: String,
    pub priority: i32,
    pub cooldown_seconds: i32,
    pub max_executions_per_hour: i32,
    pub revision: i64,
    pub rule: RuleJson,
    pub root: Node,
    /// Sensors the condition reads (the engine's index keys).
    pub sensors: BTreeSet<String>,
}

impl CompiledRule {
    pub fn actions(&self) -> &[Action] {
        &self.rule.actions
    }
}

/// A condition node with its place in rule_json; the path keys its runtime state.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub path: String,
    pub held_for_ms: Option<i64>,
    pub kind: NodeKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    Compare {
        sensor: String,
        op: Operator,
        value: f64,
        hysteresis: Option<f64>,
    },
    Compare2 {
        sensor: String,
        op: Operator,
        other: String,
        offset: f64,
    },
    All(Vec<Node>),
    Any(Vec<Node>),
    Not(Box<Node>),
    /// Minutes of the day; `days[0]` is Monday.
    Window {
        from_min: u16,
        to_min: u16,
        days: Option<[bool; 7]>,
    },
    Schedule(CronSchedule),
}

impl Node {
    /// Calls `f` on this node and every node below it.
    pub fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Node)) {
        f(self);
        match &self.kind {
            NodeKind::All(children) | NodeKind::Any(children) => {
                children.iter().for_each(|c| c.visit(f))
            }
            NodeKind::Not(child) => child.visit(f),
            _ => {}
        }
    }

    /// True if the node's truth can change with time alone (not only with readings).
    pub fn is_timed(&self) -> bool {
        let mut timed = false;
        self.visit(&mut |n| {
            timed |= n.held_for_ms.is_some()
                || matches!(n.kind, NodeKind::Window { .. } | NodeKind::Schedule(_))
        });
        timed
    }
}

pub(crate) const CONDITION_TYPES: [&str; 7] = [
    "sensor_compare",
    "sensors_compare",
    "all",
    "any",
    "not",
    "time_window",
    "schedule",
];
pub(crate) const ACTION_TYPES: [&str; 4] = ["relay_on", "relay_off", "macro", "mqtt_publish"];

/// Checks and compiles one rule. Never panics, whatever `rule_json` holds.
pub fn compile(rule: &RuleRecord, catalog: &Catalog) -> Result<CompiledRule, RuleError> {
    let value = match &rule.rule_json {
        None | Some(Value::Null) => return Err(RuleError::Null),
        Some(v) => v,
    };
    let obj = as_object(value, "rule_json")?;
    for key in obj.keys() {
        if key != "conditions" && key != "actions" {
            return Err(invalid(
                format!("unknown field `{key}`, expected `conditions` or `actions`"),
                "rule_json",
            ));
        }
    }
    let conditions = obj
        .get("conditions")
        .ok_or_else(|| invalid("missing field `conditions`".into(), "rule_json"))?;
    let actions = obj
        .get("actions")
        .ok_or_else(|| invalid("missing field `actions`".into(), "rule_json"))?;

    check_condition(conditions, "conditions", 1)?;
    let Value::Array(list) = actions else {
        return Err(invalid("expected an array of actions".into(), "actions"));
    };
    if list.is_empty() || list.len() > MAX_ACTIONS {
        return Err(RuleError::ActionCount {
            count: list.len(),
            max: MAX_ACTIONS,
        });
    }
    let mut typed_actions = Vec::with_capacity(list.len());
    for (i, action) in list.iter().enumerate() {
        let at = format!("actions[{i}]");
        let typed = check_action(action, &at)?;
        check_action_refs(&typed, &rule.device_id, catalog, &at)?;
        typed_actions.push(typed);
    }
    let typed_conditions: Condition = typed(conditions, "conditions")?;
    let root = lower(&typed_conditions, "conditions".to_owned())?;

    let mut sensors = BTreeSet::new();
    root.visit(&mut |n| match &n.kind {
        NodeKind::Compare { sensor, .. } => {
            sensors.insert(sensor.clone());
        }
        NodeKind::Compare2 { sensor, other, .. } => {
            sensors.insert(sensor.clone());
            sensors.insert(other.clone());
        }
        _ => {}
    });
    Ok(CompiledRule {
        uuid: rule.id.clone(),
        rule_id: rule.rule_id.clone(),
        rule_name: rule
            .rule_name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| rule.rule_id.clone()),
        device_id: rule.device_id.clone(),
        priority: rule.priority,
        cooldown_seconds: rule.cooldown_seconds,
        max_executions_per_hour: rule.max_executions_per_hour,
        revision: rule.revision,
        rule: RuleJson {
            conditions: typed_conditions,
            actions: typed_actions,
        },
        root,
        sensors,
    })
}

fn invalid(reason: String, at: &str) -> RuleError {
    RuleError::Invalid {
        reason,
        at: at.to_owned(),
    }
}

fn as_object<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>, RuleError> {
    v.as_object()
        .ok_or_else(|| invalid(format!("expected an object, found {}", kind_of(v)), at))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The node's `type`, checked against the known ones.
fn type_of<'a>(
    obj: &'a Map<String, Value>,
    known: &[&str],
    at: &str,
    unknown: fn(String, String) -> RuleError,
) -> Result<&'a str, RuleError> {
    match obj.get("type") {
        None => Err(invalid("missing field `type`".into(), at)),
        Some(Value::String(t)) if known.contains(&t.as_str()) => Ok(t),
        Some(Value::String(t)) => Err(unknown(t.clone(), at.to_owned())),
        Some(other) => Err(invalid(
            format!("`type` must be a string, found {}", kind_of(other)),
            at,
        )),
    }
}

/// Structure first (depth, types, operators, empty groups), children before parents, so the
/// first error reported is the innermost and serde only ever sees trees of bounded depth.
fn check_condition(v: &Value, at: &str, depth: usize) -> Result<(), RuleError> {
    if depth > MAX_DEPTH {
        return Err(RuleError::TooDeep {
            max: MAX_DEPTH,
            at: at.to_owned(),
        });
    }
    let obj = as_object(v, at)?;
    let ty = type_of(obj, &CONDITION_TYPES, at, |ty, at| {
        RuleError::UnknownConditionType { ty, at }
    })?;
    match ty {
        "all" | "any" => {
            let kind = if ty == "all" { "all" } else { "any" };
            match obj.get("conditions") {
                Some(Value::Array(children)) if children.is_empty() => {
                    return Err(RuleError::EmptyGroup {
                        kind,
                        at: at.to_owned(),
                    });
                }
                Some(Value::Array(children)) => {
                    for (i, child) in children.iter().enumerate() {
                        check_condition(child, &format!("{at}.conditions[{i}]"), depth + 1)?;
                    }
                }
                Some(other) => {
                    return Err(invalid(
                        format!("`conditions` must be an array, found {}", kind_of(other)),
                        at,
                    ));
                }
                None => {}
            }
        }
        "not" => {
            if let Some(child) = obj.get("condition") {
                check_condition(child, &format!("{at}.condition"), depth + 1)?;
            }
        }
        "sensor_compare" | "sensors_compare" => {
            if let Some(Value::String(op)) = obj.get("operator") {
                if Operator::parse(op).is_none() {
                    return Err(RuleError::BadOperator {
                        op: op.clone(),
                        at: at.to_owned(),
                    });
                }
            }
        }
        _ => {}
    }
    // Serde now reports missing/unknown fields and wrong JSON types at this node.
    typed::<Condition>(v, at).map(|_| ())
}

fn check_action(v: &Value, at: &str) -> Result<Action, RuleError> {
    let obj = as_object(v, at)?;
    type_of(obj, &ACTION_TYPES, at, |ty, at| {
        RuleError::UnknownActionType { ty, at }
    })?;
    typed(v, at)
}

fn typed<T: DeserializeOwned>(v: &Value, at: &str) -> Result<T, RuleError> {
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let inner = e.path().to_string();
        let at = if inner == "." {
            at.to_owned()
        } else {
            format!("{at}.{inner}")
        };
        RuleError::Invalid {
            reason: e.into_inner().to_string(),
            at,
        }
    })
}

fn check_action_refs(
    action: &Action,
    master: &str,
    catalog: &Catalog,
    at: &str,
) -> Result<(), RuleError> {
    match action {
        Action::RelayOn {
            slave_mac_address: mac,
            relay_number,
            ..
        }
        | Action::RelayOff {
            slave_mac_address: mac,
            relay_number,
        } => {
            let duration = match action {
                Action::RelayOn {
                    duration_seconds, ..
                } => *duration_seconds,
                _ => 0,
            };
            if duration > MAX_DURATION_SECONDS {
                return Err(invalid(
                    format!("duration_seconds {duration} out of 0..{MAX_DURATION_SECONDS}"),
                    at,
                ));
            }
            if !is_mac(mac) {
                return Err(RuleError::BadMac {
                    mac: mac.clone(),
                    at: at.to_owned(),
                });
            }
            let count = catalog.relay_count(master, mac);
            if *relay_number >= count {
                return Err(RuleError::RelayOutOfRange {
                    relay: *relay_number,
                    mac: mac.clone(),
                    count,
                    at: at.to_owned(),
                });
            }
        }
        Action::Macro { macro_id } => {
            if !catalog.macros.contains(macro_id) {
                return Err(RuleError::UnknownMacro {
                    id: macro_id.clone(),
                    at: at.to_owned(),
                });
            }
        }
        Action::MqttPublish { topic, .. } => {
            // Wildcards are for subscriptions; publishing to one is a broker error later.
            if topic.is_empty() || topic.contains(['#', '+']) {
                return Err(invalid(
                    format!("topic \"{topic}\" is empty or has a wildcard"),
                    at,
                ));
            }
        }
    }
    Ok(())
}

/// "AA:BB:CC:DD:EE:FF", either case. Lenient on input: the schema and the database ask for
/// upper case, but a rule stored before the database checked it may have lower case, and the
/// agent upper-cases every MAC before it queues a command (docs/decisions/0011).
pub fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// "HH:MM" to minutes of the day.
fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m) = (h.parse::<u16>().ok()?, m.parse::<u16>().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

fn held(seconds: Option<u32>) -> Option<i64> {
    seconds.filter(|s| *s > 0).map(|s| i64::from(s) * 1000)
}

fn finite(v: f64, at: &str) -> Result<f64, RuleError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(RuleError::NonFinite { at: at.to_owned() })
    }
}

fn name(s: &str, field: &'static str, at: &str) -> Result<String, RuleError> {
    if s.trim().is_empty() {
        return Err(RuleError::EmptyName {
            field,
            at: at.to_owned(),
        });
    }
    Ok(s.to_owned())
}

/// Typed condition to runtime node, with the semantic checks serde cannot express.
fn lower(c: &Condition, path: String) -> Result<Node, RuleError> {
    let at = path.as_str();
    let (held_for_ms, kind) = match c {
        Condition::SensorCompare {
            sensor,
            operator,
            value,
            hysteresis,
            held_for_seconds,
        } => {
            if let Some(h) = hysteresis {
                finite(*h, at)?;
                if *h < 0.0 {
                    return Err(RuleError::NegativeHysteresis {
                        hysteresis: *h,
                        at: at.to_owned(),
                    });
                }
            }
            let kind = NodeKind::Compare {
                sensor: name(sensor, "sensor", at)?,
                op: *operator,
                value: finite(*value, at)?,
                hysteresis: hysteresis.filter(|h| *h > 0.0),
            };
            (held(*held_for_seconds), kind)
        }
        Condition::SensorsCompare {
            sensor,
            operator,
            other_sensor,
            offset,
            held_for_seconds,
        } => {
            let kind = NodeKind::Compare2 {
                sensor: name(sensor, "sensor", at)?,
                op: *operator,
                other: name(other_sensor, "other_sensor", at)?,
                offset: finite(*offset, at)?,
            };
            (held(*held_for_seconds), kind)
        }
        Condition::All {
            conditions,
            held_for_seconds,
        }
        | Condition::Any {
            conditions,
            held_for_seconds,
        } => {
            let is_all = matches!(c, Condition::All { .. });
            if conditions.is_empty() {
                return Err(RuleError::EmptyGroup {
                    kind: if is_all { "all" } else { "any" },
                    at: at.to_owned(),
                });
            }
            let children = conditions
                .iter()
                .enumerate()
                .map(|(i, child)| lower(child, format!("{at}.conditions[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            (
                held(*held_for_seconds),
                if is_all {
                    NodeKind::All(children)
                } else {
                    NodeKind::Any(children)
                },
            )
        }
        Condition::Not { condition } => (
            None,
            NodeKind::Not(Box::new(lower(condition, format!("{at}.condition"))?)),
        ),
        Condition::TimeWindow { from, to, days } => {
            let from_min = parse_hhmm(from).ok_or_else(|| RuleError::BadTime {
                time: from.clone(),
                at: at.to_owned(),
            })?;
            let to_min = parse_hhmm(to).ok_or_else(|| RuleError::BadTime {
                time: to.clone(),
                at: at.to_owned(),
            })?;
            let days = days.as_ref().map(|list| {
                let mut set = [false; 7];
                list.iter().for_each(|d: &Weekday| set[d.index()] = true);
                set
            });
            if days.is_some_and(|set| !set.contains(&true)) {
                return Err(RuleError::EmptyGroup {
                    kind: "days",
                    at: at.to_owned(),
                });
            }
            (
                None,
                NodeKind::Window {
                    from_min,
                    to_min,
                    days,
                },
            )
        }
        Condition::Schedule { cron } => {
            let schedule = CronSchedule::parse(cron).map_err(|reason| RuleError::BadCron {
                cron: cron.clone(),
                at: at.to_owned(),
                reason,
            })?;
            (None, NodeKind::Schedule(schedule))
        }
    };
    Ok(Node {
        path,
        held_for_ms,
        kind,
    })
}
