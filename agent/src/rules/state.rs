//! A rule's runtime memory, persisted by the runtime so a restart neither re-fires a rule in
//! cooldown nor forgets how long a condition has held.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Sliding window of the hourly execution limit.
pub const HOUR_MS: i64 = 3_600_000;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RuleState {
    /// The rule revision this state belongs to; a new revision starts from a fresh state.
    pub revision: i64,
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

    pub fn is_armed(&self, path: &str) -> bool {
        self.armed.get(path).copied().unwrap_or(true)
    }

    /// Drops firing times that left the hourly window.
    pub fn prune(&mut self, now_ms: i64) {
        self.recent_firings_ms
            .retain(|t| now_ms.saturating_sub(*t) < HOUR_MS);
    }
}
