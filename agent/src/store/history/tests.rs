//! The bounded history: row and age bounds hold under a sustained rate, rollups are right and
//! outlive the raw readings, replay reaches back through them, the file shrinks after a drain,
//! an older database migrates, and the outbox never loses a reading to a prune.

use std::path::Path;

use serde_json::json;

use super::*;
use crate::store::Store;

const DEV: &str = "ESP32_HIDRO_F44738";
/// 2026-12-01T00:00:00Z.
const T0: i64 = 1_764_547_200_000;

fn reading(sensor: &str, value: f64, at_ms: i64) -> Reading {
    Reading {
        device_id: DEV.into(),
        sensor_key: sensor.into(),
        value,
        unit: None,
        recorded_at_ms: at_ms,
        received_at_ms: Some(at_ms + 20),
    }
}

fn bounds() -> HistoryBounds {
    HistoryBounds {
        raw_hours: 168,
        raw_rows_max: 3_000_000,
        rollup_days: 30,
        rollup_rows_max: 3_000_000,
        prune_rows_per_step: 20_000,
        vacuum_pages_per_step: 2_048,
    }
}

fn count(store: &Store, table: &str) -> u64 {
    store
        .conn
        .query_row(&format!("select count(*) from {table}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as u64
}

/// The database file's size once the WAL is folded in and cut back, as `ls` would show it
/// after the agent's next checkpoint.
fn file_bytes(store: &Store, path: &Path) -> u64 {
    store
        .conn
        .execute_batch("pragma wal_checkpoint(truncate)")
        .unwrap();
    std::fs::metadata(path).unwrap().len()
}

/// `n` readings at `rate_per_s` from `start`, over 10 sensors, in batches of `batch`, handed to
/// `each` with the time the batch ends.
fn readings_at_rate(
    start: i64,
    n: usize,
    rate_per_s: usize,
    batch: usize,
    mut each: impl FnMut(&[Reading], i64),
) {
    let step_ms = 1_000 / rate_per_s as i64 * 10;
    let mut buffer = Vec::with_capacity(batch);
    for i in 0..n {
        let at = start + (i / 10) as i64 * step_ms;
        buffer.push(reading(&format!("s{}", i % 10), (i % 97) as f64 / 10.0, at));
        if buffer.len() == batch {
            each(&buffer, at);
            buffer.clear();
        }
    }
    if let Some(last) = buffer.last().map(|r| r.recorded_at_ms) {
        each(&buffer, last);
    }
}

#[test]
fn the_plan_prunes_by_age_and_by_rows_and_gives_back_all_but_the_kept_pages() {
    let b = HistoryBounds {
        raw_hours: 2,
        raw_rows_max: 1_000,
        rollup_days: 1,
        rollup_rows_max: 500,
        prune_rows_per_step: 300,
        vacuum_pages_per_step: 100,
    };
    let now = T0 + 5 * 3_600_000 + 12_345;
    let plan = b.plan(
        &HistoryStats {
            raw_rows: 1_250,
            rollup_rows: 400,
            ..HistoryStats::default()
        },
        now,
    );
    assert_eq!(plan.raw_before_ms, T0 + 3 * 3_600_000, "a minute's start");
    assert_eq!(plan.raw_excess_rows, 250);
    assert_eq!(plan.rollup_before_ms, T0 + 5 * 3_600_000 - 86_400_000);
    assert_eq!(plan.rollup_excess_rows, 0);
    assert_eq!(plan.rows_max, 300);
    assert_eq!(b.vacuum_pages(FREE_PAGES_KEPT), 0, "a few free pages stay");
    assert_eq!(b.vacuum_pages(FREE_PAGES_KEPT + 40), 40);
    assert_eq!(
        b.vacuum_pages(FREE_PAGES_KEPT + 4_000),
        100,
        "bounded per step"
    );
}

#[test]
fn the_raw_table_stays_under_its_row_bound_and_the_file_stops_growing_under_a_sustained_rate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    let mut store = Store::open(&path).unwrap();
    assert_eq!(
        store.auto_vacuum_mode().unwrap(),
        2,
        "a new file is incremental"
    );
    let b = HistoryBounds {
        raw_rows_max: 20_000,
        prune_rows_per_step: 5_000,
        ..bounds()
    };
    let mut sizes = Vec::new();
    let mut batches = 0;
    // 120,000 readings at 500/s (4 minutes), committed in batches of 1,000 (2 s), the outbox
    // pushed as it goes (the backend is up) and a housekeeping step after every batch.
    readings_at_rate(T0, 120_000, 500, 1_000, |batch, at| {
        store.enqueue_readings(batch, at).unwrap();
        store.conn.execute("delete from outbox", []).unwrap();
        store.history_step(&b, at).unwrap();
        let stats = store.history_stats().unwrap();
        assert!(
            stats.raw_rows <= b.raw_rows_max,
            "{} raw rows after a step, bound {}",
            stats.raw_rows,
            b.raw_rows_max
        );
        batches += 1;
        if batches % 10 == 0 {
            assert_eq!(stats.raw_rows, count(&store, "readings_history"), "counted");
            sizes.push(file_bytes(&store, &path));
        }
    });
    assert_eq!(
        store.history_stats().unwrap().rollup_rows,
        count(&store, "readings_rollup")
    );
    // Past the first quarter (the raw table filled), the file no longer grows with the
    // readings: 90,000 more readings cost the rollups' few pages and the kept free pages.
    let settled = sizes[sizes.len() / 4];
    let last = *sizes.last().unwrap();
    assert!(
        last <= settled + (FREE_PAGES_KEPT + 256) * 4_096,
        "file grew from {settled} to {last} bytes under the bound: {sizes:?}"
    );
}

#[test]
fn raw_readings_older_than_the_window_are_pruned_and_their_minutes_stay_as_rollups() {
    let mut store = Store::open_in_memory().unwrap();
    // One reading per sensor every 30 s for 3 hours.
    let readings: Vec<Reading> = (0..360)
        .flat_map(|i| {
            let at = T0 + i * 30_000;
            [
                reading("ph", 6.0 + (i % 10) as f64 / 10.0, at),
                reading("ec", 1.2, at),
            ]
        })
        .collect();
    store.enqueue_readings(&readings, T0).unwrap();
    let now = T0 + 3 * 3_600_000;
    let b = HistoryBounds {
        raw_hours: 1,
        ..bounds()
    };
    let step = store.history_step(&b, now).unwrap();
    assert_eq!(
        step.raw_deleted, 480,
        "two hours of 2 sensors at 2 a minute"
    );
    let cutoff = now - 3_600_000;
    assert_eq!(store.history_stats().unwrap().raw_from_ms, Some(cutoff));
    let oldest: i64 = store
        .conn
        .query_row(
            "select min(recorded_at_ms) from readings_history",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(oldest, cutoff);
    assert_eq!(store.history_stats().unwrap().raw_rows, 240);
    assert!(
        store
            .readings_between(DEV, T0, cutoff - 1)
            .unwrap()
            .is_empty()
    );
    let rollups = store.rollups_between(DEV, Some("ph"), T0, now).unwrap();
    assert_eq!(rollups.len(), 180, "every minute of the 3 hours");
    assert_eq!(rollups[0].minute_ms, T0);
    assert_eq!(rollups[0].count, 2);
}

#[test]
fn rollups_keep_min_max_avg_last_and_count_and_outlive_the_raw_readings() {
    let mut store = Store::open_in_memory().unwrap();
    let m = T0 + 10 * 60_000;
    // Two batches into one minute, the latest reading in the first, a retried reading in the
    // second (counted once), and the next minute's first reading.
    store
        .enqueue_readings(
            &[
                reading("ph", 6.4, m + 1_000),
                reading("ph", 5.9, m + 50_000),
                reading("ph", 7.1, m + 20_000),
            ],
            m,
        )
        .unwrap();
    store
        .enqueue_readings(
            &[
                reading("ph", 6.8, m + 40_000),
                reading("ph", 6.4, m + 1_000),
                reading("ph", 6.0, m + 60_000),
            ],
            m,
        )
        .unwrap();
    let check = |store: &Store| {
        let r = store
            .rollups_between(DEV, Some("ph"), m, m + 60_000)
            .unwrap();
        assert_eq!(r.len(), 2, "{r:?}");
        let first = &r[0];
        assert_eq!(first.minute_ms, m);
        assert_eq!(first.count, 4);
        assert_eq!(first.min, 5.9);
        assert_eq!(first.max, 7.1);
        assert!((first.avg - (6.4 + 5.9 + 7.1 + 6.8) / 4.0).abs() < 1e-9);
        assert_eq!(first.last, 5.9, "the latest reading, not the last received");
        assert_eq!(first.last_at_ms, m + 50_000);
        assert_eq!(first.last_received_at_ms, Some(m + 50_020));
        assert_eq!(
            (r[1].minute_ms, r[1].count, r[1].last),
            (m + 60_000, 1, 6.0)
        );
    };
    check(&store);
    assert_eq!(store.history_stats().unwrap().rollup_rows, 2);
    // A day later with a 1-hour raw window: the raw readings go, the rollups stay.
    let b = HistoryBounds {
        raw_hours: 1,
        ..bounds()
    };
    assert_eq!(
        store.history_step(&b, m + 86_400_000).unwrap().raw_deleted,
        5
    );
    assert_eq!(count(&store, "readings_history"), 0);
    check(&store);
    // A reading that arrives late, from before the raw window, goes to its minute only.
    store
        .enqueue_readings(&[reading("ph", 9.0, m + 30_000)], m + 86_400_000)
        .unwrap();
    assert_eq!(count(&store, "readings_history"), 0);
    let r = store.rollups_between(DEV, Some("ph"), m, m).unwrap();
    assert_eq!((r[0].count, r[0].max, r[0].last), (5, 9.0, 5.9));
    // Rollups older than rollup_days go too.
    let step = store.history_step(&b, m + 31 * 86_400_000).unwrap();
    assert_eq!(step.rollup_deleted, 2);
    assert_eq!(store.history_stats().unwrap().rollup_rows, 0);
}

#[test]
fn rollups_over_their_row_bound_lose_their_oldest_minutes() {
    let mut store = Store::open_in_memory().unwrap();
    let readings: Vec<Reading> = (0..30_000)
        .map(|i| reading("ph", 6.0, T0 + i * 60_000))
        .collect();
    store.enqueue_readings(&readings, T0).unwrap();
    let b = HistoryBounds {
        raw_hours: 0,
        raw_rows_max: 10_000,
        rollup_days: 3_660,
        rollup_rows_max: 10_000,
        prune_rows_per_step: 100_000,
        ..bounds()
    };
    let now = T0 + 30_000 * 60_000;
    store.history_step(&b, now).unwrap();
    let stats = store.history_stats().unwrap();
    assert_eq!(stats.rollup_rows, 10_000);
    assert_eq!(count(&store, "readings_rollup"), 10_000);
    let oldest = store.rollups_between(DEV, None, 0, i64::MAX).unwrap()[0].minute_ms;
    assert_eq!(
        oldest,
        T0 + 20_000 * 60_000,
        "the newest 10,000 minutes stay"
    );
}

#[test]
fn a_replay_reaches_back_through_the_rollups_after_the_raw_readings_are_pruned() {
    use crate::rules::{Catalog, EngineSettings, replay};
    let mut store = Store::open_in_memory().unwrap();
    // pH falls from 6.8 to 6.0 over 40 minutes, one reading every 10 s.
    let readings: Vec<Reading> = (0..240)
        .map(|i| reading("ph", 6.8 - 0.8 * i as f64 / 239.0, T0 + i * 10_000))
        .collect();
    store.enqueue_readings(&readings, T0).unwrap();
    let rule = crate::store::RuleRecord {
        id: "uuid-seed".into(),
        device_id: DEV.into(),
        rule_id: "RULE_001".into(),
        rule_name: None,
        rule_description: None,
        rule_json: Some(json!({
            "conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
            "actions": [{"type": "relay_on", "slave_mac_address": "14:33:5C:38:BF:60",
                         "relay_number": 0, "duration_seconds": 60}]})),
        enabled: true,
        priority: 50,
        cooldown_seconds: 300,
        max_executions_per_hour: 0,
        revision: 1,
        deleted: false,
        changed_at: String::new(),
    };
    let settings = EngineSettings {
        stale_after_ms: 60_000,
        time_zone: jiff::tz::TimeZone::UTC,
    };
    let end = T0 + 40 * 60_000;
    let raw = store.readings_for_replay(DEV, T0, end).unwrap();
    assert_eq!((raw.readings.len(), raw.from_rollups), (240, 0));
    let live = replay(&rule, &Catalog::default(), &settings, raw.readings).unwrap();
    assert!(!live.is_empty());

    // A week later, with a 1-hour raw window, only the rollups cover those 40 minutes.
    let b = HistoryBounds {
        raw_hours: 1,
        ..bounds()
    };
    store.history_step(&b, end + 7 * 86_400_000).unwrap();
    assert_eq!(count(&store, "readings_history"), 0);
    let old = store.readings_for_replay(DEV, T0, end).unwrap();
    assert_eq!(old.from_rollups, 40, "one reading per minute");
    assert_eq!(old.readings.len(), 40);
    assert!(
        old.readings
            .iter()
            .all(|r| r.recorded_at_ms % 60_000 == 50_000)
    );
    let replayed = replay(&rule, &Catalog::default(), &settings, old.readings).unwrap();
    assert_eq!(
        replayed.len(),
        live.len(),
        "the same firings, each within the minute live fired in"
    );
    for (r, l) in replayed.iter().zip(&live) {
        assert_eq!(
            minute_of(r.fired_at_ms),
            minute_of(l.fired_at_ms),
            "{r:?} {l:?}"
        );
    }
}

#[test]
fn the_file_shrinks_after_an_outbox_drain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    let mut store = Store::open(&path).unwrap();
    // An outage: 60,000 readings wait in the outbox (and the history).
    readings_at_rate(T0, 60_000, 500, 5_000, |batch, at| {
        store.enqueue_readings(batch, at).unwrap();
    });
    let before = file_bytes(&store, &path);
    // The backend is back: the outbox drains.
    loop {
        let seqs: Vec<i64> = store
            .conn
            .prepare("select seq from outbox order by seq limit 5000")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        if seqs.is_empty() {
            break;
        }
        store.outbox_delivered(&seqs).unwrap();
    }
    let free_before = store.history_stats().unwrap().freelist_pages;
    assert!(free_before > 1_000, "the drain freed pages: {free_before}");
    let b = HistoryBounds {
        vacuum_pages_per_step: 500,
        ..bounds()
    };
    let mut steps = 0;
    loop {
        let free = store.history_stats().unwrap().freelist_pages;
        let step = store.history_step(&b, T0 + 200_000).unwrap();
        steps += 1;
        assert_eq!(
            step.pages_vacuumed,
            (free - FREE_PAGES_KEPT).min(500),
            "a full, bounded step: {step:?}"
        );
        if !step.more {
            break;
        }
    }
    assert_eq!(
        steps,
        (free_before - FREE_PAGES_KEPT).div_ceil(500),
        "given back over several steps"
    );
    let after = file_bytes(&store, &path);
    let free_after = store.history_stats().unwrap().freelist_pages;
    assert!(
        free_after <= FREE_PAGES_KEPT,
        "{free_after} free pages left"
    );
    assert!(
        after + (free_before - FREE_PAGES_KEPT) * 4_096 <= before + 4_096,
        "the file gave its free pages back: {before} -> {after} bytes"
    );
    assert_eq!(
        count(&store, "readings_history"),
        60_000,
        "the history kept"
    );
}

#[test]
fn pruning_the_history_never_touches_the_readings_the_outbox_still_has_to_push() {
    let mut store = Store::open_in_memory().unwrap();
    let readings: Vec<Reading> = (0..100)
        .map(|i| reading("ph", 6.5, T0 + i * 60_000))
        .collect();
    store.enqueue_readings(&readings, T0).unwrap();
    let b = HistoryBounds {
        raw_hours: 0,
        rollup_days: 1,
        ..bounds()
    };
    store.history_step(&b, T0 + 30 * 86_400_000).unwrap();
    assert_eq!(count(&store, "readings_history"), 0);
    assert_eq!(count(&store, "readings_rollup"), 0);
    let queued = store.outbox_due(i64::MAX, 1_000).unwrap();
    assert_eq!(queued.len(), 100, "every reading still waits for the cloud");
}

#[test]
fn a_database_of_schema_5_migrates_its_history_and_switches_to_incremental_vacuum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    {
        // As an agent of schema 5 made it: no auto-vacuum, a history, a queued reading.
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("pragma journal_mode = wal").unwrap();
        for sql in &crate::store::schema::MIGRATIONS[..5] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 5).unwrap();
        let tx = conn.transaction().unwrap();
        let mut insert = tx
            .prepare(
                "insert into readings_history (device_id, sensor_key, recorded_at_ms, value, received_at_ms)
                 values (?1, 'ph', ?2, ?3, ?4)",
            )
            .unwrap();
        for i in 0..5_000i64 {
            let received = (i % 2 == 0).then_some(T0 + i * 1_000 + 5);
            insert
                .execute(params![DEV, T0 + i * 1_000, (i % 60) as f64, received])
                .unwrap();
        }
        drop(insert);
        tx.execute(
            "insert into outbox (class, idempotency_key, payload, created_at_ms)
             values ('telemetry', 'k1', '{}', 1)",
            [],
        )
        .unwrap();
        tx.commit().unwrap();
        let mode: i64 = conn
            .query_row("pragma auto_vacuum", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, 0);
    }
    let mut store = Store::open(&path).unwrap();
    assert!(Store::schema_version() >= 6);
    let stats = store.history_stats().unwrap();
    assert_eq!((stats.raw_rows, stats.rollup_rows), (5_000, 84), "counted");
    let r = store.rollups_between(DEV, Some("ph"), T0, T0).unwrap();
    // T0 is a minute's start: the first minute holds values 0..=59.
    assert_eq!(
        (r[0].count, r[0].min, r[0].max, r[0].last),
        (60, 0.0, 59.0, 59.0)
    );
    assert_eq!(r[0].last_at_ms, T0 + 59_000);
    assert_eq!(
        r[0].last_received_at_ms, None,
        "an odd reading: arrival unknown"
    );
    assert_eq!(store.auto_vacuum_mode().unwrap(), 0, "not until the VACUUM");
    assert!(store.ensure_incremental_vacuum().unwrap());
    assert_eq!(store.auto_vacuum_mode().unwrap(), 2);
    assert!(!store.ensure_incremental_vacuum().unwrap(), "once");
    assert_eq!(count(&store, "readings_history"), 5_000, "data kept");
    assert_eq!(store.outbox_due(i64::MAX, 10).unwrap().len(), 1);
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.auto_vacuum_mode().unwrap(), 2, "it stays");
}

#[test]
fn rules_test_replays_a_range_only_the_rollups_cover_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    let mut store = Store::open(&path).unwrap();
    let readings: Vec<Reading> = (0..240)
        .map(|i| reading("ph", 6.8 - 0.8 * i as f64 / 239.0, T0 + i * 10_000))
        .collect();
    store.enqueue_readings(&readings, T0).unwrap();
    let end = T0 + 40 * 60_000;
    let b = HistoryBounds {
        raw_hours: 1,
        ..bounds()
    };
    store.history_step(&b, end + 86_400_000).unwrap();
    drop(store);
    let text = format!(
        "[agent]\nid = \"pi-test\"\n[store]\npath = \"{}\"\n[cloud]\nrest_url = \"http://127.0.0.1:9\"\n\
         jwt = \"t\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:9\"\n[engine]\ntime_zone = \"UTC\"\n",
        path.display()
    );
    let config =
        crate::config::AgentConfig::from_toml(&text, Path::new("test.toml"), std::iter::empty())
            .unwrap();
    let rule = crate::cli::RuleUnderTest::Json {
        rule_json: json!({
            "conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
            "actions": [{"type": "relay_on", "slave_mac_address": "14:33:5C:38:BF:60",
                         "relay_number": 0, "duration_seconds": 60}]}),
        device_id: DEV.into(),
        cooldown_seconds: 3_600,
        max_executions_per_hour: 0,
    };
    let report = crate::cli::rules_test(&config, &rule, T0, end).unwrap();
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(
        lines[0], "rule RULE_UNDER_TEST on ESP32_HIDRO_F44738: 40 readings replayed, 1 firings",
        "{report}"
    );
    assert!(
        lines[1].starts_with("note: 40 of them stand for a minute each"),
        "{report}"
    );
    assert_eq!(lines.len(), 3, "one firing: {report}");
}
