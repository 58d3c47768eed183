//! What the console's Events and Rules pages show: the agent's events and rule firings since it
//! started, kept in memory and bounded. The outbox hands the same rows to the cloud and forgets
//! them once delivered; the Pi's operator needs them with the cloud gone, so they are copied
//! here as they are made.

use std::collections::VecDeque;

use serde_json::Value;

/// Events kept; older ones go first.
pub const EVENTS_MAX: usize = 500;
/// Rule firings kept; older ones go first.
pub const FIRINGS_MAX: usize = 200;

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at_ms: i64,
    pub event_type: String,
    /// info, warning, error or critical.
    pub severity: String,
    /// The master it concerns, when it names one.
    pub device: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Firing {
    pub at_ms: i64,
    pub rule_id: String,
    pub rule_name: Option<String>,
    pub device: String,
    /// executed or refused.
    pub result: String,
    pub explanation: String,
}

#[derive(Debug, Default)]
pub struct Journal {
    events: VecDeque<Event>,
    firings: VecDeque<Firing>,
}

impl Journal {
    /// Records an outbox row if it is an event (`event_type`) or a rule execution
    /// (`{"kind": "execution", "row": ...}`); other rows are not the journal's.
    pub fn record(&mut self, payload: &Value, now_ms: i64) {
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        if payload.get("kind").and_then(Value::as_str) == Some("execution") {
            let row = &payload["row"];
            self.push_firing(Firing {
                at_ms: text(row, "executed_at")
                    .and_then(|t| crate::cloud::parse_timestamp_ms(&t))
                    .unwrap_or(now_ms),
                rule_id: text(row, "rule_id").unwrap_or_default(),
                rule_name: text(row, "rule_name"),
                device: text(row, "device_id").unwrap_or_default(),
                result: text(row, "result").unwrap_or_default(),
                explanation: text(row, "explanation").unwrap_or_default(),
            });
        } else if let Some(event_type) = text(payload, "event_type") {
            let inner = &payload["payload"];
            let device = ["device_id", "master", "master_device_id"]
                .iter()
                .find_map(|k| text(inner, k))
                .or_else(|| text(payload, "device_id"));
            self.push_event(Event {
                at_ms: text(payload, "occurred_at")
                    .and_then(|t| crate::cloud::parse_timestamp_ms(&t))
                    .unwrap_or(now_ms),
                event_type,
                severity: text(payload, "severity").unwrap_or_else(|| "info".into()),
                device,
                message: text(payload, "message").unwrap_or_default(),
            });
        }
    }

    pub fn push_event(&mut self, event: Event) {
        if self.events.len() >= EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    pub fn push_firing(&mut self, firing: Firing) {
        if self.firings.len() >= FIRINGS_MAX {
            self.firings.pop_front();
        }
        self.firings.push_back(firing);
    }

    /// Events, newest first, of `severity` and `device` when given.
    pub fn events(&self, severity: Option<&str>, device: Option<&str>) -> Vec<Event> {
        self.events
            .iter()
            .rev()
            .filter(|e| severity.is_none_or(|s| e.severity == s))
            .filter(|e| device.is_none_or(|d| e.device.as_deref() == Some(d)))
            .cloned()
            .collect()
    }

    /// The last `n` firings of rule `rule_id` (every rule when None), newest first.
    pub fn firings(&self, rule_id: Option<&str>, n: usize) -> Vec<Firing> {
        self.firings
            .iter()
            .rev()
            .filter(|f| rule_id.is_none_or(|r| f.rule_id == r))
            .take(n)
            .cloned()
            .collect()
    }

    /// The most recent event of `event_type`.
    pub fn last_of(&self, event_type: &str) -> Option<Event> {
        self.events
            .iter()
            .rev()
            .find(|e| e.event_type == event_type)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_and_firings_are_told_apart_and_filtered() {
        let mut j = Journal::default();
        j.record(
            &json!({"event_type": "mutex_violation", "severity": "warning", "message": "m",
                    "payload": {"master": "M1"}, "occurred_at": "2026-12-03T10:00:00Z"}),
            0,
        );
        j.record(
            &json!({"event_type": "emergency_stop", "severity": "critical", "message": "stop",
                    "payload": {}}),
            5,
        );
        j.record(
            &json!({"kind": "execution", "row": {"rule_id": "R1", "device_id": "M1",
                    "result": "executed", "explanation": "ph 6.4 < 6.5"}}),
            7,
        );
        j.record(&json!({"kind": "telemetry"}), 8);
        assert_eq!(j.events(None, None).len(), 2);
        assert_eq!(j.events(Some("critical"), None)[0].message, "stop");
        assert_eq!(j.events(None, Some("M1"))[0].event_type, "mutex_violation");
        assert_eq!(j.events(None, Some("M1"))[0].at_ms, 1_796_292_000_000);
        let f = j.firings(Some("R1"), 5);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].at_ms, f[0].explanation.as_str()), (7, "ph 6.4 < 6.5"));
        assert!(j.firings(Some("R2"), 5).is_empty());
        assert_eq!(j.last_of("emergency_stop").unwrap().at_ms, 5);
    }

    #[test]
    fn the_journal_is_bounded_and_keeps_the_newest() {
        let mut j = Journal::default();
        for i in 0..(EVENTS_MAX + 10) {
            j.record(
                &json!({"event_type": "e", "message": i.to_string()}),
                i as i64,
            );
        }
        let events = j.events(None, None);
        assert_eq!(events.len(), EVENTS_MAX);
        assert_eq!(events[0].message, (EVENTS_MAX + 9).to_string());
        assert_eq!(events.last().unwrap().message, "10");
    }
}
