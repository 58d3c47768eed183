//! A rule's runtime memory, persisted by the runtime so a restart neither re-fires a rule in
//! cooldown nor forgets how long a condition has held.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Sliding window of the hourly execution limit.
pub const HOUR_MS: i64 = 3_600_000;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RuleState {
    /// The rule revision this state belongs to.
    pub revision: i64,
    /// SHA-256 (hex) of the rule's `conditions`: a new revision whose conditions are the same
    /// (a rename, a new priority, other actions) keeps its timers and arming.
    pub conditions: String,
    pub last_fired_ms: Option<i64>,
    /// Firing times within the last hour (the hourly limit's sliding window).
    pub recent_firings_ms: Vec<i64>,
    /// Condition node path -> when it became continuously true (held_for_seconds).
    pub held_since_ms: BTreeMap<String, i64>,
    /// Hysteresis node path -> armed; a missing path is armed.
    pub armed: BTreeMap<String, bool>,
    /// Schedule node path -> the evaluation time that last consumed an occurrence.
    pub schedule_last_ms: BTreeMap<String, i64>,
}

impl RuleState {
    pub fn fresh(revision: i64) -> RuleState {
        RuleState {
            revision,
            ..RuleState::default()
        }
    }

    /// The state of a new revision of the rule, from the old revision's. The firing history
    /// always carries over: the cooldown and the hourly limit are promises about the relay, not
    /// about a revision (a changed cooldown or limit applies to the same history). Held-for
    /// timers, hysteresis arming and schedule baselines are keyed by the condition's paths, so
    /// they carry over only when the conditions are unchanged.
    pub fn for_revision(&self, revision: i64, conditions: &str) -> RuleState {
        let same_conditions = !self.conditions.is_empty() && self.conditions == conditions;
        RuleState {
            revision,
            conditions: conditions.to_string(),
            last_fired_ms: self.last_fired_ms,
            recent_firings_ms: self.recent_firings_ms.clone(),
            held_since_ms: if same_conditions {
                self.held_since_ms.clone()
            } else {
                BTreeMap::new()
            },
            armed: if same_conditions {
                self.armed.clone()
            } else {
                BTreeMap::new()
            },
            schedule_last_ms: if same_conditions {
                self.schedule_last_ms.clone()
            } else {
                BTreeMap::new()
            },
        }
    }

    pub fn is_armed(&self, path: &str) -> bool {
        self.armed.get(path).copied().unwrap_or(true)
    }

    /// Drops firing times that left the hourly window.
    pub fn prune(&mut self, now_ms: i64) {
        self.recent_firings_ms
            .retain(|t| now_ms.saturating_sub(*t) < HOUR_MS);
    }
}
