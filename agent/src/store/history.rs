//! The reading history on the Pi (docs/decisions/0014): raw readings kept for at most
//! `[history] raw_hours` and `raw_rows_max` rows, one-minute rollups per device and sensor (min,
//! max, sum, count, last) kept for `rollup_days` and `rollup_rows_max` rows, and the pages a
//! prune or an outbox drain frees given back to the file system in bounded steps
//! (`auto_vacuum = INCREMENTAL`). The history is not the outbox: the outbox keeps its own copy
//! of every reading until the cloud has it, and nothing here touches it.
//!
//! What to prune and how much to vacuum is decided by [`HistoryBounds`] from [`HistoryStats`]
//! (no I/O); the store carries it out; a thin task in `runtime` drives it on an interval.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};

use super::{Reading, Result, Store, add_counter};

pub const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// Counters (table `counters`) kept in the transactions that add or delete rows.
const RAW_ROWS: &str = "history_raw_rows";
const ROLLUP_ROWS: &str = "history_rollup_rows";
/// Cursor: raw readings before this time (a minute's start, Unix ms) are pruned or being
/// pruned; below it only rollups answer. Set before the rows go, in the same transaction as the
/// first delete, so a replay never reads a minute whose raw readings are half deleted.
const RAW_FROM: &str = "history_raw_from_ms";
/// Free pages left in the file: a minute of raw readings pruned is refilled by the next
/// minute's, so giving those pages back and taking them again would only wear the SD card.
pub const FREE_PAGES_KEPT: u64 = 1_024;

/// The start of the minute holding `t_ms`.
pub fn minute_of(t_ms: i64) -> i64 {
    t_ms - t_ms.rem_euclid(MINUTE_MS)
}

/// The history's bounds and step sizes, from `[history]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryBounds {
    pub raw_hours: u64,
    pub raw_rows_max: u64,
    pub rollup_days: u64,
    pub rollup_rows_max: u64,
    /// Rows deleted per table in one step, at most: the store's lock is held that long.
    pub prune_rows_per_step: u64,
    /// Pages given back in one step, at most.
    pub vacuum_pages_per_step: u64,
}

/// What one housekeeping step starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HistoryStats {
    pub raw_rows: u64,
    pub rollup_rows: u64,
    /// Raw readings before this are pruned (None: never pruned).
    pub raw_from_ms: Option<i64>,
    pub page_count: u64,
    pub freelist_pages: u64,
    pub page_size: u64,
}

/// What one step prunes: everything older than the age cutoffs, and the oldest rows over the
/// row bounds, at most `rows_max` rows per table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrunePlan {
    pub raw_before_ms: i64,
    pub raw_excess_rows: u64,
    pub rollup_before_ms: i64,
    pub rollup_excess_rows: u64,
    pub rows_max: u64,
    pub now_ms: i64,
}

impl HistoryBounds {
    /// The prune one step does at `now_ms`. Cutoffs are minute starts, so the raw table always
    /// holds whole minutes and the rollups answer for exactly the minutes before them.
    pub fn plan(&self, stats: &HistoryStats, now_ms: i64) -> PrunePlan {
        let hours = i64::try_from(self.raw_hours).unwrap_or(i64::MAX / HOUR_MS);
        let days = i64::try_from(self.rollup_days).unwrap_or(i64::MAX / DAY_MS);
        PrunePlan {
            raw_before_ms: minute_of(now_ms.saturating_sub(hours.saturating_mul(HOUR_MS))),
            raw_excess_rows: stats.raw_rows.saturating_sub(self.raw_rows_max),
            rollup_before_ms: minute_of(now_ms.saturating_sub(days.saturating_mul(DAY_MS))),
            rollup_excess_rows: stats.rollup_rows.saturating_sub(self.rollup_rows_max),
            rows_max: self.prune_rows_per_step,
            now_ms,
        }
    }

    /// Pages to give back with `incremental_vacuum` when `freelist_pages` are free: all but
    /// [`FREE_PAGES_KEPT`], at most `vacuum_pages_per_step`.
    pub fn vacuum_pages(&self, freelist_pages: u64) -> u64 {
        freelist_pages
            .saturating_sub(FREE_PAGES_KEPT)
            .min(self.vacuum_pages_per_step)
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepReport {
    pub raw_deleted: u64,
    pub rollup_deleted: u64,
    pub pages_vacuumed: u64,
    /// Free pages left after the step.
    pub freelist_pages: u64,
    /// A bound was still exceeded, or pages are still to give back: the step was cut short.
    pub more: bool,
}

/// One minute of one sensor, as the rollups keep it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    pub device_id: String,
    pub sensor_key: String,
    pub minute_ms: i64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub last: f64,
    pub last_at_ms: i64,
    pub last_received_at_ms: Option<i64>,
    pub count: u64,
}

/// A minute's readings of one sensor within one batch.
struct MinuteAgg {
    min: f64,
    max: f64,
    sum: f64,
    count: i64,
    last: f64,
    last_at_ms: i64,
    last_received_at_ms: Option<i64>,
}

/// Readings for a replay: raw where kept, one reading per minute (its last) before.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayReadings {
    pub readings: Vec<Reading>,
    /// How many of them stand for a minute (rollups), all before `raw_from_ms`.
    pub from_rollups: usize,
    pub raw_from_ms: Option<i64>,
}

fn raw_from(conn: &rusqlite::Connection) -> Result<Option<i64>> {
    let text: Option<String> = conn
        .prepare_cached("select value from cursors where name = ?1")?
        .query_row([RAW_FROM], |r| r.get(0))
        .optional()?;
    Ok(text.and_then(|t| t.parse().ok()))
}

/// Records a batch of readings in the history, in the caller's transaction: raw rows (a
/// reading already kept is skipped) and their minutes' rollups. A reading older than the raw
/// window (a master's late backlog) goes to its rollup only, so the raw table never holds a
/// minute the rollups answer for.
pub(super) fn record(tx: &rusqlite::Connection, readings: &[Reading]) -> Result<()> {
    let from = raw_from(tx)?;
    let mut raw_added = 0i64;
    let mut minutes: BTreeMap<(&str, &str, i64), MinuteAgg> = BTreeMap::new();
    {
        let mut raw = tx.prepare_cached(
            "insert into readings_history (device_id, sensor_key, recorded_at_ms, value, received_at_ms)
             values (?1, ?2, ?3, ?4, ?5) on conflict do nothing",
        )?;
        for r in readings {
            if from.is_none_or(|f| r.recorded_at_ms >= f) {
                let n = raw.execute(params![
                    r.device_id,
                    r.sensor_key,
                    r.recorded_at_ms,
                    r.value,
                    r.received_at_ms
                ])?;
                if n == 0 {
                    // Already kept (a retried batch): already in its rollup too.
                    continue;
                }
                raw_added += 1;
            }
            let key = (
                r.device_id.as_str(),
                r.sensor_key.as_str(),
                minute_of(r.recorded_at_ms),
            );
            let agg = minutes.entry(key).or_insert(MinuteAgg {
                min: r.value,
                max: r.value,
                sum: 0.0,
                count: 0,
                last: r.value,
                last_at_ms: r.recorded_at_ms,
                last_received_at_ms: r.received_at_ms,
            });
            agg.min = agg.min.min(r.value);
            agg.max = agg.max.max(r.value);
            agg.sum += r.value;
            agg.count += 1;
            if r.recorded_at_ms >= agg.last_at_ms {
                agg.last = r.value;
                agg.last_at_ms = r.recorded_at_ms;
                agg.last_received_at_ms = r.received_at_ms;
            }
        }
    }
    let mut rollups_added = 0i64;
    {
        // The row as it is after the upsert: a count equal to this batch's means it is new.
        let mut upsert = tx.prepare_cached(
            "insert into readings_rollup (device_id, sensor_key, minute_ms, min, max, sum, count,
                last, last_at_ms, last_received_at_ms)
             values (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             on conflict (device_id, sensor_key, minute_ms) do update set
                min = min(readings_rollup.min, excluded.min),
                max = max(readings_rollup.max, excluded.max),
                sum = readings_rollup.sum + excluded.sum,
                count = readings_rollup.count + excluded.count,
                last = case when excluded.last_at_ms >= readings_rollup.last_at_ms
                            then excluded.last else readings_rollup.last end,
                last_received_at_ms = case when excluded.last_at_ms >= readings_rollup.last_at_ms
                            then excluded.last_received_at_ms else readings_rollup.last_received_at_ms end,
                last_at_ms = max(readings_rollup.last_at_ms, excluded.last_at_ms)
             returning count",
        )?;
        for ((device, sensor, minute), a) in &minutes {
            let count: i64 = upsert.query_row(
                params![
                    device,
                    sensor,
                    minute,
                    a.min,
                    a.max,
                    a.sum,
                    a.count,
                    a.last,
                    a.last_at_ms,
                    a.last_received_at_ms
                ],
                |r| r.get(0),
            )?;
            if count == a.count {
                rollups_added += 1;
            }
        }
    }
    if raw_added > 0 {
        add_counter(tx, RAW_ROWS, raw_added)?;
    }
    if rollups_added > 0 {
        add_counter(tx, ROLLUP_ROWS, rollups_added)?;
    }
    Ok(())
}

fn reading_from_row(device_id: &str) -> impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<Reading> {
    move |r| {
        Ok(Reading {
            device_id: device_id.to_string(),
            sensor_key: r.get(0)?,
            recorded_at_ms: r.get(1)?,
            value: r.get(2)?,
            unit: None,
            received_at_ms: r.get(3)?,
        })
    }
}

impl Store {
    /// Raw readings of one device in `[from_ms, to_ms]` that the history still holds, oldest
    /// first (none before the raw window: those minutes are the rollups').
    pub fn readings_between(
        &self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Reading>> {
        let from_ms = from_ms.max(raw_from(&self.conn)?.unwrap_or(i64::MIN));
        let mut stmt = self.conn.prepare_cached(
            "select sensor_key, recorded_at_ms, value, received_at_ms from readings_history
             where device_id = ?1 and recorded_at_ms between ?2 and ?3
             order by recorded_at_ms, sensor_key",
        )?;
        let rows = stmt.query_map(
            params![device_id, from_ms, to_ms],
            reading_from_row(device_id),
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One-minute rollups of one device (one sensor, or all) whose minute starts in
    /// `[from_ms, to_ms]`, by time: what a chart draws.
    pub fn rollups_between(
        &self,
        device_id: &str,
        sensor_key: Option<&str>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Rollup>> {
        let mut stmt = self.conn.prepare_cached(
            "select sensor_key, minute_ms, min, max, sum, count, last, last_at_ms, last_received_at_ms
             from readings_rollup
             where device_id = ?1 and (?2 is null or sensor_key = ?2) and minute_ms between ?3 and ?4
             order by minute_ms, sensor_key",
        )?;
        let rows = stmt.query_map(params![device_id, sensor_key, from_ms, to_ms], |r| {
            let sum: f64 = r.get(4)?;
            let count: i64 = r.get(5)?;
            Ok(Rollup {
                device_id: device_id.to_string(),
                sensor_key: r.get(0)?,
                minute_ms: r.get(1)?,
                min: r.get(2)?,
                max: r.get(3)?,
                avg: sum / count.max(1) as f64,
                count: count as u64,
                last: r.get(6)?,
                last_at_ms: r.get(7)?,
                last_received_at_ms: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// What `rules test` replays over `[from_ms, to_ms]`: the raw readings where the history
    /// still holds them, and before that one reading per sensor and minute, the minute's last
    /// (a value the engine really saw, at the time it was recorded and arrived).
    pub fn readings_for_replay(
        &self,
        device_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<ReplayReadings> {
        let raw_from_ms = raw_from(&self.conn)?;
        let mut readings = Vec::new();
        if let Some(w) = raw_from_ms.filter(|w| from_ms < *w) {
            let mut stmt = self.conn.prepare_cached(
                "select sensor_key, last_at_ms, last, last_received_at_ms from readings_rollup
                 where device_id = ?1 and minute_ms between ?2 and ?3 and last_at_ms between ?4 and ?5
                 order by last_at_ms, sensor_key",
            )?;
            let until = to_ms.min(w - 1);
            let rows = stmt.query_map(
                params![device_id, minute_of(from_ms), until, from_ms, until],
                reading_from_row(device_id),
            )?;
            readings = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        }
        let from_rollups = readings.len();
        readings.extend(self.readings_between(device_id, from_ms, to_ms)?);
        Ok(ReplayReadings {
            readings,
            from_rollups,
            raw_from_ms,
        })
    }

    /// The history's counters and the file's pages.
    pub fn history_stats(&self) -> Result<HistoryStats> {
        let pragma = |name: &str| -> Result<u64> {
            Ok(self
                .conn
                .query_row(&format!("pragma {name}"), [], |r| r.get::<_, i64>(0))?
                .max(0) as u64)
        };
        Ok(HistoryStats {
            raw_rows: self.counter(RAW_ROWS)?.max(0) as u64,
            rollup_rows: self.counter(ROLLUP_ROWS)?.max(0) as u64,
            raw_from_ms: raw_from(&self.conn)?,
            page_count: pragma("page_count")?,
            freelist_pages: pragma("freelist_count")?,
            page_size: pragma("page_size")?,
        })
    }

    /// One housekeeping step at `now_ms`: the prune [`HistoryBounds::plan`] decides (one
    /// transaction per table), then up to [`HistoryBounds::vacuum_pages`] pages given back.
    pub fn history_step(&mut self, bounds: &HistoryBounds, now_ms: i64) -> Result<StepReport> {
        let plan = bounds.plan(&self.history_stats()?, now_ms);
        let (raw_deleted, raw_more) = self.prune_raw(&plan)?;
        let (rollup_deleted, rollup_more) = self.prune_rollups(&plan)?;
        let free: i64 = self
            .conn
            .query_row("pragma freelist_count", [], |r| r.get(0))?;
        let pages = bounds.vacuum_pages(free.max(0) as u64);
        if pages > 0 {
            self.incremental_vacuum(pages)?;
        }
        let free_after: i64 = self
            .conn
            .query_row("pragma freelist_count", [], |r| r.get(0))?;
        let free_after = free_after.max(0) as u64;
        Ok(StepReport {
            raw_deleted,
            rollup_deleted,
            pages_vacuumed: (free.max(0) as u64).saturating_sub(free_after),
            freelist_pages: free_after,
            more: raw_more || rollup_more || bounds.vacuum_pages(free_after) > 0,
        })
    }

    /// Gives back up to `pages` free pages (the file shrinks at the next WAL checkpoint).
    /// Nothing happens unless the database is in incremental auto-vacuum.
    pub fn incremental_vacuum(&mut self, pages: u64) -> Result<()> {
        // The pragma frees one page per step of the statement: run it to the end.
        let mut stmt = self
            .conn
            .prepare(&format!("pragma incremental_vacuum({pages})"))?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
        Ok(())
    }

    /// Switches a database made before schema 6 to `auto_vacuum = INCREMENTAL`: one full VACUUM,
    /// which rewrites the whole file (needing as much free space again, and time in proportion
    /// to the data kept; run it after the history is within its bounds). Returns whether it ran;
    /// a database already incremental (every one created since schema 6) is left alone.
    pub fn ensure_incremental_vacuum(&mut self) -> Result<bool> {
        let mode: i64 = self
            .conn
            .query_row("pragma auto_vacuum", [], |r| r.get(0))?;
        if mode == 2 {
            return Ok(false);
        }
        self.conn
            .execute_batch("pragma auto_vacuum = incremental; vacuum;")?;
        Ok(true)
    }

    /// Folds the WAL into the database file and cuts it back to nothing, so the file's size is
    /// the data's (the agent's own checkpoints run by themselves every 1,000 pages).
    pub fn checkpoint(&mut self) -> Result<()> {
        self.conn.execute_batch("pragma wal_checkpoint(truncate)")?;
        Ok(())
    }

    /// Bytes on disk of the raw readings (table and index) and of the rollups (`dbstat`, which
    /// reads every page: for benchmarks and tests, not for the housekeeper).
    pub fn history_bytes(&self) -> Result<(u64, u64)> {
        let bytes = |names: &str| -> Result<u64> {
            Ok(self.conn.query_row(
                &format!(
                    "select coalesce(sum(pgsize), 0) from dbstat where name in ({names})
                     and aggregate = true"
                ),
                [],
                |r| r.get::<_, i64>(0),
            )? as u64)
        };
        Ok((
            bytes("'readings_history', 'readings_history_time'")?,
            bytes("'readings_rollup', 'readings_rollup_time'")?,
        ))
    }

    /// The database's auto-vacuum mode: 0 none, 1 full, 2 incremental.
    pub fn auto_vacuum_mode(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("pragma auto_vacuum", [], |r| r.get(0))?)
    }

    /// Deletes raw readings before the plan's cutoffs, at most `rows_max`; returns how many and
    /// whether some are still due.
    fn prune_raw(&mut self, plan: &PrunePlan) -> Result<(u64, bool)> {
        let tx = self.conn.savepoint()?;
        // A window start in the future is a clock that was set back: start again from now's.
        let kept = raw_from(&tx)?.filter(|w| *w <= plan.now_ms);
        let mut before = plan.raw_before_ms.max(kept.unwrap_or(i64::MIN));
        if plan.raw_excess_rows > 0 {
            let nth = plan.raw_excess_rows.min(plan.rows_max).max(1);
            let at: Option<i64> = tx
                .query_row(
                    "select recorded_at_ms from readings_history order by recorded_at_ms
                     limit 1 offset ?1",
                    [nth as i64 - 1],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(at) = at {
                // The whole minute goes: the raw table holds whole minutes only.
                before = before.max(minute_of(at) + MINUTE_MS);
            }
        }
        if raw_from(&tx)? != Some(before) {
            tx.prepare_cached(
                "insert into cursors (name, value) values (?1, ?2)
                 on conflict (name) do update set value = excluded.value",
            )?
            .execute(params![RAW_FROM, before.to_string()])?;
        }
        let deleted = tx
            .prepare_cached(
                "delete from readings_history where (device_id, sensor_key, recorded_at_ms) in (
                select device_id, sensor_key, recorded_at_ms from readings_history
                where recorded_at_ms < ?1 order by recorded_at_ms limit ?2)",
            )?
            .execute(params![before, plan.rows_max as i64])? as u64;
        if deleted > 0 {
            add_counter(&tx, RAW_ROWS, -(deleted as i64))?;
        }
        tx.commit()?;
        Ok((deleted, deleted >= plan.rows_max))
    }

    /// Deletes rollups before the plan's cutoff and the oldest over the row bound, at most
    /// `rows_max`; returns how many and whether some are still due.
    fn prune_rollups(&mut self, plan: &PrunePlan) -> Result<(u64, bool)> {
        let tx = self.conn.savepoint()?;
        let mut before = plan.rollup_before_ms;
        if plan.rollup_excess_rows > 0 {
            let nth = plan.rollup_excess_rows.min(plan.rows_max).max(1);
            let at: Option<i64> = tx
                .query_row(
                    "select minute_ms from readings_rollup order by minute_ms limit 1 offset ?1",
                    [nth as i64 - 1],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(at) = at {
                before = before.max(at + MINUTE_MS);
            }
        }
        let deleted = tx
            .prepare_cached(
                "delete from readings_rollup where (device_id, sensor_key, minute_ms) in (
                select device_id, sensor_key, minute_ms from readings_rollup
                where minute_ms < ?1 order by minute_ms limit ?2)",
            )?
            .execute(params![before, plan.rows_max as i64])? as u64;
        if deleted > 0 {
            add_counter(&tx, ROLLUP_ROWS, -(deleted as i64))?;
        }
        tx.commit()?;
        Ok((deleted, deleted >= plan.rows_max))
    }
}

#[cfg(test)]
mod tests;
