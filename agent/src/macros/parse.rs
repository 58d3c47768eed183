//! Backend rows (`macros` with embedded `macro_actions`) to [`MacroDef`].

use super::{MacroDef, MacroError, MacroStep, StepKind};
use crate::safety::{MAX_RELAY, normalize_mac};
use serde_json::{Map, Value};

const MAX_SEQUENCE: i64 = 1000;
const MAX_DELAY_MS: i64 = 3_600_000;
/// A macro relay step may ask for at most a day; the relay's max on-time caps it further.
const MAX_DURATION_S: i64 = 86_400;

/// Parses one `macros` row as `select=*,macro_actions(*)` returns it.
pub fn parse_macro(row: &Value) -> Result<MacroDef, MacroError> {
    let obj = row.as_object().ok_or(MacroError::NotAnObject)?;
    let bad = |field: &'static str, reason: &str| MacroError::BadField {
        field,
        reason: reason.to_string(),
    };
    let id = match obj.get("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => return Err(bad("id", "missing or not a non-empty string")),
    };
    let name = match obj.get("name") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(bad("name", "not a string")),
    };
    // Not explicitly enabled = does not run.
    let enabled = match obj.get("enabled") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("enabled", "not true or false")),
    };
    let revision = match obj.get("revision") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| bad("revision", "not an integer"))?,
    };
    let actions: &[Value] = match obj.get("macro_actions") {
        None | Some(Value::Null) => &[],
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("macro_actions", "not an array")),
    };

    // Order by sequence first, so step numbers in messages follow the macro's order.
    let mut ordered: Vec<(i64, &Map<String, Value>)> = Vec::with_capacity(actions.len());
    for (i, a) in actions.iter().enumerate() {
        let step_err = |sequence: Option<i64>, reason: String| MacroError::BadStep {
            index: i + 1,
            sequence,
            reason,
        };
        let a = a
            .as_object()
            .ok_or_else(|| step_err(None, "not an object".into()))?;
        let seq = match a.get("sequence") {
            Some(v) => v
                .as_i64()
                .ok_or_else(|| step_err(None, format!("sequence {v} is not an integer")))?,
            None => return Err(step_err(None, "sequence missing".into())),
        };
        if !(0..=MAX_SEQUENCE).contains(&seq) {
            return Err(step_err(None, format!("sequence {seq} out of 0..=1000")));
        }
        ordered.push((seq, a));
    }
    ordered.sort_by_key(|(seq, _)| *seq);

    let mut steps = Vec::with_capacity(ordered.len());
    for (i, (seq, a)) in ordered.iter().enumerate() {
        let step_err = |reason: String| MacroError::BadStep {
            index: i + 1,
            sequence: Some(*seq),
            reason,
        };
        if i > 0 && ordered[i - 1].0 == *seq {
            return Err(step_err("sequence used by two steps".into()));
        }
        steps.push(parse_step(*seq, a).map_err(step_err)?);
    }
    Ok(MacroDef {
        id,
        name,
        enabled,
        revision,
        steps,
    })
}

/// Parses a PostgREST array of macro rows: the good ones, and each bad one's id (or
/// `#index` when it has none) with why.
pub fn parse_macros(rows: &Value) -> (Vec<MacroDef>, Vec<(String, MacroError)>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let Some(rows) = rows.as_array() else {
        bad.push((String::from("#0"), MacroError::NotAnObject));
        return (good, bad);
    };
    for (i, row) in rows.iter().enumerate() {
        match parse_macro(row) {
            Ok(d) => good.push(d),
            Err(e) => {
                let id = row
                    .get("id")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("#{i}"), str::to_string);
                bad.push((id, e));
            }
        }
    }
    (good, bad)
}

fn int_in(
    v: Option<&Value>,
    name: &str,
    range: std::ops::RangeInclusive<i64>,
    default: Option<i64>,
) -> Result<i64, String> {
    let n = match v {
        None | Some(Value::Null) => {
            return default.ok_or_else(|| format!("{name} missing"));
        }
        Some(v) => v
            .as_i64()
            .ok_or_else(|| format!("{name} {v} is not an integer"))?,
    };
    if !range.contains(&n) {
        return Err(format!(
            "{name} {n} out of {}..={}",
            range.start(),
            range.end()
        ));
    }
    Ok(n)
}

fn parse_step(sequence: i64, a: &Map<String, Value>) -> Result<MacroStep, String> {
    let delay_ms = int_in(a.get("delay_ms"), "delay_ms", 0..=MAX_DELAY_MS, Some(0))?;
    let condition = match a.get("condition_check") {
        None | Some(Value::Null) => None,
        Some(c) => Some(c.clone()),
    };
    let empty = Map::new();
    let payload = match a.get("action_payload") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(p)) => p,
        Some(_) => return Err("action_payload is not an object".into()),
    };
    let action_type = match a.get("action_type") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err("action_type missing or not a string".into()),
    };
    let kind = match action_type {
        "relay" => parse_relay(payload)?,
        "delay" => StepKind::Delay,
        "mqtt_publish" => {
            let topic = match payload.get("topic") {
                Some(Value::String(t)) if !t.is_empty() => t.clone(),
                _ => return Err("mqtt_publish: topic missing or empty".into()),
            };
            if topic.contains(['+', '#']) || topic.len() > 65_535 {
                return Err(format!(
                    "mqtt_publish: topic '{topic}' is not a publishable topic (no + or #)"
                ));
            }
            let retain = match payload.get("retain") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err("mqtt_publish: retain is not true or false".into()),
            };
            StepKind::MqttPublish {
                topic,
                payload: payload.get("payload").cloned().unwrap_or(Value::Null),
                retain,
            }
        }
        "macro" => match a.get("action_target") {
            Some(Value::String(t)) if !t.trim().is_empty() => StepKind::Macro {
                macro_id: t.clone(),
            },
            _ => return Err("macro: action_target (the nested macro's id) missing".into()),
        },
        other => {
            return Err(format!(
                "unknown action_type '{other}' (relay, delay, mqtt_publish or macro)"
            ));
        }
    };
    Ok(MacroStep {
        sequence: i32::try_from(sequence).unwrap_or(i32::MAX),
        delay_ms: u32::try_from(delay_ms).unwrap_or(u32::MAX),
        condition,
        kind,
    })
}

fn parse_relay(p: &Map<String, Value>) -> Result<StepKind, String> {
    let master = match p.get("master_device_id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => return Err("relay: master_device_id missing".into()),
    };
    let slave_mac = match p.get("slave_mac_address") {
        Some(Value::String(s)) => normalize_mac(s).ok_or_else(|| {
            format!("relay: slave_mac_address '{s}' is not like AA:BB:CC:DD:EE:FF")
        })?,
        _ => return Err("relay: slave_mac_address missing".into()),
    };
    let relay = int_in(
        p.get("relay_number"),
        "relay_number",
        0..=i64::from(MAX_RELAY),
        None,
    )?;
    let on = match p.get("action") {
        Some(Value::String(s)) if s == "on" => true,
        Some(Value::String(s)) if s == "off" => false,
        _ => return Err("relay: action must be \"on\" or \"off\"".into()),
    };
    let duration = int_in(
        p.get("duration_seconds"),
        "duration_seconds",
        0..=MAX_DURATION_S,
        Some(0),
    )?;
    Ok(StepKind::Relay {
        master,
        slave_mac,
        relay: u8::try_from(relay).unwrap_or(u8::MAX),
        on,
        duration_s: if on {
            u32::try_from(duration).unwrap_or(0)
        } else {
            0
        },
    })
}
