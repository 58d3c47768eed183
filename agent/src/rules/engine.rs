//! The sans-I/O decision engine: readings and the time go in, firings and state changes come
//! out. The runtime (or `driver`) owns the clock and the I/O.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::compile::{Catalog, CompiledRule, Node, NodeKind, compile};
use super::contradiction::{Contradiction, contradictions};
use super::eval::{Ctx, Explain, Latest, Tri, eval, explain};
use super::model::Action;
use super::state::{HOUR_MS, RuleState};
use crate::store::{Reading, RuleRecord};

#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    /// A reading older than this is unknown.
    pub stale_after_ms: i64,
    /// Time zone of time windows and cron schedules.
    pub time_zone: jiff::tz::TimeZone,
}

/// A rule that could not be loaded, with the reason for `decision_rules.last_error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleProblem {
    /// decision_rules.id.
    pub rule: String,
    pub rule_id: String,
    pub device_id: String,
    pub revision: i64,
    pub reason: String,
}

/// A reading that made a rule true.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FiringReading {
    pub sensor: String,
    pub value: f64,
    pub recorded_at_ms: i64,
}

/// A rule fired: run its actions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Firing {
    /// decision_rules.id.
    pub rule: String,
    pub rule_id: String,
    pub rule_name: String,
    pub device_id: String,
    pub priority: i32,
    pub actions: Vec<Action>,
    pub fired_at_ms: i64,
    pub readings: Vec<FiringReading>,
    /// E.g. "ph 6.31 < 6.5 held 32 s; 3/10 this hour".
    pub explanation: String,
    /// Firings in the last hour, this one included.
    pub hourly_count: u32,
    /// max_executions_per_hour (0 = no limit).
    pub hourly_max: u32,
    pub cooldown_seconds: i32,
}

#[derive(Debug)]
struct Loaded {
    rule: CompiledRule,
    state: RuleState,
    /// Whether time alone can change the rule's truth (held-for, window, schedule).
    timed: bool,
    /// When on_tick must next evaluate it (timed rules only).
    due_ms: Option<i64>,
}

#[derive(Debug)]
pub struct Engine {
    settings: EngineSettings,
    /// Sorted by priority DESC, rule_id, uuid: the order firings come out in.
    rules: Vec<Loaded>,
    /// device -> sensor -> indices into `rules`, ascending (so in priority order).
    index: HashMap<String, HashMap<String, Vec<usize>>>,
    /// device -> sensor -> latest reading.
    latest: HashMap<String, HashMap<String, Latest>>,
    blocked: bool,
    dirty: BTreeSet<String>,
    contradictions: Vec<Contradiction>,
    evaluations: u64,
    /// Reused by every evaluation (see `Ctx::trace`).
    trace: Vec<(Tri, Tri)>,
}

impl Engine {
    pub fn new(settings: EngineSettings) -> Engine {
        Engine {
            settings,
            rules: Vec::new(),
            index: HashMap::new(),
            latest: HashMap::new(),
            blocked: false,
            dirty: BTreeSet::new(),
            contradictions: Vec::new(),
            evaluations: 0,
            trace: Vec::new(),
        }
    }

    /// Replaces the rule set. Disabled and deleted rules are skipped; a rule that does not
    /// compile is returned as a problem and the others run. State is kept in memory for a rule
    /// whose revision is unchanged, else restored from `states` if it has the same revision.
    pub fn load(
        &mut self,
        rules: &[RuleRecord],
        catalog: &Catalog,
        states: &HashMap<String, RuleState>,
    ) -> Vec<RuleProblem> {
        let mut problems = Vec::new();
        let mut compiled = Vec::new();
        for record in rules.iter().filter(|r| r.enabled && !r.deleted) {
            match compile(record, catalog) {
                Ok(rule) => compiled.push(rule),
                Err(e) => problems.push(RuleProblem {
                    rule: record.id.clone(),
                    rule_id: record.rule_id.clone(),
                    device_id: record.device_id.clone(),
                    revision: record.revision,
                    reason: e.to_string(),
                }),
            }
        }
        compiled.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.rule_id.cmp(&b.rule_id))
                .then_with(|| a.uuid.cmp(&b.uuid))
        });
        self.contradictions = contradictions(&compiled);

        let mut old: HashMap<String, Loaded> = self
            .rules
            .drain(..)
            .map(|l| (l.rule.uuid.clone(), l))
            .collect();
        for rule in compiled {
            let timed = rule.root.is_timed();
            let loaded = match old.remove(&rule.uuid) {
                Some(prev) if prev.state.revision == rule.revision => Loaded {
                    rule,
                    timed,
                    ..prev
                },
                prev => {
                    let conditions = conditions_fingerprint(&rule);
                    let earlier = prev
                        .map(|p| p.state)
                        .or_else(|| states.get(&rule.uuid).cloned());
                    let state = match earlier {
                        Some(s) if s.revision == rule.revision => s,
                        Some(s) => {
                            self.dirty.insert(rule.uuid.clone());
                            s.for_revision(rule.revision, &conditions)
                        }
                        None => {
                            self.dirty.insert(rule.uuid.clone());
                            RuleState {
                                conditions,
                                ..RuleState::fresh(rule.revision)
                            }
                        }
                    };
                    let due_ms = initial_due(&rule.root, &state);
                    Loaded {
                        rule,
                        state,
                        timed,
                        due_ms,
                    }
                }
            };
            self.rules.push(loaded);
        }
        self.index.clear();
        for (i, loaded) in self.rules.iter().enumerate() {
            let sensors = self.index.entry(loaded.rule.device_id.clone()).or_default();
            for sensor in &loaded.rule.sensors {
                sensors.entry(sensor.clone()).or_default().push(i);
            }
        }
        problems
    }

    /// Contradicting rule pairs of the last load.
    pub fn contradictions(&self) -> &[Contradiction] {
        &self.contradictions
    }

    /// The compiled rules of the last load, in firing order.
    pub fn rules(&self) -> impl Iterator<Item = &CompiledRule> {
        self.rules.iter().map(|l| &l.rule)
    }

    /// Rule evaluations so far (the index test counts them).
    pub fn evaluations(&self) -> u64 {
        self.evaluations
    }

    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Emergency stop: readings are still remembered, but nothing is evaluated, so nothing
    /// fires and no timer or arming changes. On the reset (`blocked` false) nothing completes by
    /// itself in that instant: held-for timers start counting again from the reset, and schedule
    /// occurrences that fell during the stop are consumed, not run; a rule acts again on its next
    /// reading or its next occurrence.
    pub fn set_blocked(&mut self, blocked: bool, now_ms: i64) {
        if self.blocked && !blocked {
            for loaded in &mut self.rules {
                let state = &mut loaded.state;
                let mut schedules = Vec::new();
                loaded.rule.root.visit(&mut |n| {
                    if matches!(n.kind, NodeKind::Schedule(_)) {
                        schedules.push(n.path.clone());
                    }
                });
                if state.held_since_ms.is_empty() && schedules.is_empty() {
                    continue;
                }
                state.held_since_ms.clear();
                for path in schedules {
                    state.schedule_last_ms.insert(path, now_ms);
                }
                self.dirty.insert(loaded.rule.uuid.clone());
                if loaded.timed {
                    loaded.due_ms = Some(now_ms);
                }
            }
        }
        self.blocked = blocked;
    }

    /// Remembers the reading, then evaluates the rules of its device that read its sensor.
    pub fn on_reading(&mut self, reading: &Reading, now_ms: i64) -> Vec<Firing> {
        if !reading.value.is_finite() {
            return Vec::new();
        }
        let at_ms = reading.recorded_at_ms.min(now_ms);
        // Look up before inserting: the device's key is cloned only for its first reading.
        if !self.latest.contains_key(&reading.device_id) {
            self.latest
                .insert(reading.device_id.clone(), HashMap::new());
        }
        let Some(sensors) = self.latest.get_mut(&reading.device_id) else {
            return Vec::new();
        };
        match sensors.get_mut(&reading.sensor_key) {
            // An older reading arriving late changes nothing.
            Some(prev) if prev.at_ms > at_ms => return Vec::new(),
            Some(prev) => {
                *prev = Latest {
                    value: reading.value,
                    at_ms,
                }
            }
            None => {
                sensors.insert(
                    reading.sensor_key.clone(),
                    Latest {
                        value: reading.value,
                        at_ms,
                    },
                );
            }
        }
        if self.blocked {
            return Vec::new();
        }
        let Some(targets) = self
            .index
            .get(&reading.device_id)
            .and_then(|s| s.get(&reading.sensor_key))
        else {
            return Vec::new();
        };
        let latest = self.latest.get(&reading.device_id);
        let mut firings = Vec::new();
        for &i in targets {
            self.evaluations += 1;
            let Some(loaded) = self.rules.get_mut(i) else {
                continue;
            };
            firings.extend(evaluate(
                loaded,
                latest,
                &self.settings,
                &mut self.trace,
                &mut self.dirty,
                now_ms,
            ));
        }
        firings
    }

    /// Evaluates the rules whose held-for, schedule, window or limit deadline has come.
    pub fn on_tick(&mut self, now_ms: i64) -> Vec<Firing> {
        if self.blocked {
            return Vec::new();
        }
        let mut firings = Vec::new();
        for loaded in &mut self.rules {
            if loaded.due_ms.is_some_and(|d| d <= now_ms) {
                self.evaluations += 1;
                let latest = self.latest.get(&loaded.rule.device_id);
                firings.extend(evaluate(
                    loaded,
                    latest,
                    &self.settings,
                    &mut self.trace,
                    &mut self.dirty,
                    now_ms,
                ));
            }
        }
        firings
    }

    /// When on_tick should next run; None while blocked or when only readings matter.
    pub fn next_deadline_ms(&self) -> Option<i64> {
        if self.blocked {
            return None;
        }
        self.rules.iter().filter_map(|l| l.due_ms).min()
    }

    /// States changed since the last call, for the runtime to persist.
    pub fn take_dirty(&mut self) -> Vec<(String, RuleState)> {
        let dirty = std::mem::take(&mut self.dirty);
        self.rules
            .iter()
            .filter(|l| dirty.contains(&l.rule.uuid))
            .map(|l| (l.rule.uuid.clone(), l.state.clone()))
            .collect()
    }

    /// The state of a loaded rule (by decision_rules.id).
    pub fn state(&self, uuid: &str) -> Option<&RuleState> {
        self.rules
            .iter()
            .find(|l| l.rule.uuid == uuid)
            .map(|l| &l.state)
    }
}

/// Evaluates one rule. Allocates nothing unless the rule fires or its state changes: the
/// explanation is built by re-walking the evaluation's trace only for a firing, and the rule
/// is marked dirty only when the evaluation really changed its state.
fn evaluate(
    loaded: &mut Loaded,
    latest: Option<&HashMap<String, Latest>>,
    settings: &EngineSettings,
    trace: &mut Vec<(Tri, Tri)>,
    dirty: &mut BTreeSet<String>,
    now_ms: i64,
) -> Option<Firing> {
    trace.clear();
    let mut ctx = Ctx {
        latest,
        now_ms,
        stale_after_ms: settings.stale_after_ms,
        tz: &settings.time_zone,
        state: &mut loaded.state,
        trace,
        due_ms: None,
        stale_edge_ms: None,
        changed: false,
    };
    let tri = eval(&loaded.rule.root, &mut ctx);
    let (mut due, stale_edge, mut changed) = (ctx.due_ms, ctx.stale_edge_ms, ctx.changed);
    let rule = &loaded.rule;
    let state = &mut loaded.state;
    // A running held-for timer must reset when one of its readings goes stale.
    if !state.held_since_ms.is_empty() {
        if let Some(edge) = stale_edge {
            earlier(&mut due, edge);
        }
    }

    let mut firing = None;
    if tri == Tri::True {
        let before = state.recent_firings_ms.len();
        state.prune(now_ms);
        changed |= state.recent_firings_ms.len() != before;
        let cooldown_ms = i64::from(rule.cooldown_seconds.max(0)) * 1000;
        let cooldown_end = state.last_fired_ms.map(|t| t.saturating_add(cooldown_ms));
        let max = u32::try_from(rule.max_executions_per_hour).unwrap_or(0);
        let in_cooldown = cooldown_end.is_some_and(|end| now_ms < end);
        let at_limit = max > 0 && state.recent_firings_ms.len() >= max as usize;
        if !in_cooldown && !at_limit {
            let mut hysteresis_true = Vec::new();
            let outcome = explain(
                &rule.root,
                &Explain {
                    latest,
                    now_ms,
                    state,
                    trace,
                },
                &mut 0,
                &mut hysteresis_true,
            );
            changed = true;
            state.last_fired_ms = Some(now_ms);
            state.recent_firings_ms.push(now_ms);
            // A held-for rule fires once per hold: its holds count again from this firing, so
            // with cooldown 0 it does not fire again at the next reading a few ms later.
            for since in state.held_since_ms.values_mut() {
                *since = now_ms;
            }
            for path in hysteresis_true {
                state.armed.insert(path, false);
            }
            let count = u32::try_from(state.recent_firings_ms.len()).unwrap_or(u32::MAX);
            let limit = if max > 0 {
                format!("{count}/{max} this hour")
            } else {
                format!("{count} this hour")
            };
            firing = Some(Firing {
                rule: rule.uuid.clone(),
                rule_id: rule.rule_id.clone(),
                rule_name: rule.rule_name.clone(),
                device_id: rule.device_id.clone(),
                priority: rule.priority,
                actions: rule.rule.actions.clone(),
                fired_at_ms: now_ms,
                readings: outcome.readings,
                explanation: format!("{}; {limit}", outcome.why.join(" and ")),
                hourly_count: count,
                hourly_max: max,
                cooldown_seconds: rule.cooldown_seconds,
            });
        } else if loaded.timed {
            // True but limited: look again when the limit lifts (readings do that for
            // sensor-only rules).
            if let Some(end) = cooldown_end.filter(|_| in_cooldown) {
                earlier(&mut due, end);
            }
            if at_limit {
                if let Some(first) = state.recent_firings_ms.iter().min() {
                    earlier(&mut due, first.saturating_add(HOUR_MS));
                }
            }
        }
    }
    loaded.due_ms = if loaded.timed {
        due.filter(|d| *d > now_ms)
    } else {
        None
    };
    if changed && !dirty.contains(&loaded.rule.uuid) {
        dirty.insert(loaded.rule.uuid.clone());
    }
    firing
}

/// SHA-256 (hex) of a rule's conditions as JSON: serde_json writes a struct the same way every
/// time, so equal conditions give equal fingerprints across restarts.
fn conditions_fingerprint(rule: &CompiledRule) -> String {
    let json = serde_json::to_vec(&rule.rule.conditions).unwrap_or_default();
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &json).as_ref())
}

fn earlier(slot: &mut Option<i64>, t: i64) {
    if slot.is_none_or(|s| t < s) {
        *slot = Some(t);
    }
}

/// First evaluation of a freshly loaded rule: at once if it has a window or schedule (a
/// schedule needs its baseline); else when a restored held-for timer ends. A held-for rule is
/// not evaluated before its readings arrive, so a restored timer keeps counting.
fn initial_due(root: &Node, state: &RuleState) -> Option<i64> {
    let mut due: Option<i64> = None;
    root.visit(&mut |n| {
        if matches!(n.kind, NodeKind::Window { .. } | NodeKind::Schedule(_)) {
            due = Some(i64::MIN);
        }
        if let (Some(hold), Some(since)) = (n.held_for_ms, state.held_since_ms.get(&n.path)) {
            earlier(&mut due, since.saturating_add(hold));
        }
    });
    due
}
