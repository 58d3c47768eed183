//! Replaying stored readings through one rule, as `autocore-agent rules test` does: the clock
//! is each reading's arrival time (its own time when that is unknown), with ticks at the
//! deadlines in between, so cooldown, the hourly limit and staleness apply as they did live: a
//! reading that arrived already stale fires nothing in replay either.

use std::collections::HashMap;

use super::compile::{Catalog, compile};
use super::engine::{Engine, EngineSettings, Firing};
use super::error::RuleError;
use crate::store::{Reading, RuleRecord};

/// Ticks between two readings before giving up (a cron firing every second over a day is
/// 86,400; this bounds a pathological rule, not a real one).
const MAX_TICKS: usize = 1_000_000;

/// Runs a fresh engine with only `rule` (enabled or not) over `readings`, sorted by time.
pub fn replay(
    rule: &RuleRecord,
    catalog: &Catalog,
    settings: &EngineSettings,
    readings: impl IntoIterator<Item = Reading>,
) -> Result<Vec<Firing>, RuleError> {
    // Compile first so a bad rule is an error, not a silently empty replay.
    compile(rule, catalog)?;
    let record = RuleRecord {
        enabled: true,
        deleted: false,
        ..rule.clone()
    };
    let mut engine = Engine::new(settings.clone());
    engine.load(std::slice::from_ref(&record), catalog, &HashMap::new());

    let mut readings: Vec<Reading> = readings.into_iter().collect();
    let arrival = |r: &Reading| r.received_at_ms.unwrap_or(r.recorded_at_ms);
    readings.sort_by_key(|r| (arrival(r), r.recorded_at_ms));
    let mut firings = Vec::new();
    let mut clock: Option<i64> = None;
    for reading in readings {
        let t = arrival(&reading);
        let mut ticks = 0;
        while let Some(deadline) = engine.next_deadline_ms() {
            if deadline >= t || ticks >= MAX_TICKS {
                break;
            }
            // The first tick (a schedule's baseline) happens at the first reading's time.
            let at = deadline.max(clock.unwrap_or(t));
            firings.extend(engine.on_tick(at));
            clock = Some(at);
            ticks += 1;
        }
        firings.extend(engine.on_tick(t));
        firings.extend(engine.on_reading(&reading, t));
        clock = Some(t);
    }
    Ok(firings)
}
