//! `bench-history`: the Pi's bounded reading history (issue 16, docs/decisions/0014). Writes
//! readings through the agent's store as the telemetry writer does (a batch per 500 ms of
//! simulated time, the outbox pushed after each batch while the backend is up), runs a
//! housekeeping step (`Store::history_step`) every 5 s of simulated time, all as fast as the
//! machine goes, and prints:
//!
//! 1. the database's size per simulated minute, and its growth per minute before and after the
//!    raw row bound is reached;
//! 2. the steady-state size under the bound, and the bytes a raw row and a rollup take;
//! 3. the wall time of one housekeeping step (prune + incremental vacuum), p50/p99/max;
//! 4. an outage (the outbox not pushed), then its drain: the file's size before the drain, right
//!    after it, and after the housekeeper gave the pages back, with its steps' times.
//!
//! Environment (all optional): `AUTOCORE_BENCH_RATE` (readings/s, default 500),
//! `AUTOCORE_BENCH_MINUTES` (simulated minutes, default 60), `AUTOCORE_BENCH_RAW_ROWS_MAX`
//! (default 600000: 20 minutes at 500/s, so the bound is reached within the hour),
//! `AUTOCORE_BENCH_OUTAGE_MINUTES` (default 10). The database is in the temp folder
//! (`TMPDIR`: point it at an SD card to measure one).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, ensure};
use autocore_agent::store::{HistoryBounds, Reading, Store};
use autocore_stack::bench::{data_folder, env_number, load_average, machine_lines, percentile};

/// Ten masters with ten sensors each; the rate is spread over them.
const MASTERS: usize = 10;
const SENSORS: [&str; 10] = [
    "ph",
    "ec",
    "water_temp",
    "air_temp",
    "humidity",
    "level",
    "flow",
    "pressure",
    "co2",
    "light",
];
/// The telemetry writer's flush interval (`[store] telemetry_flush_ms`).
const BATCH_MS: i64 = 500;
/// `[history] housekeeping_interval_ms`.
const HOUSEKEEPING_MS: i64 = 5_000;
/// `[cloud] push_batch_rows_max`.
const PUSH_BATCH: usize = 1_000;
/// 2026-12-01T00:00:00Z.
const T0: i64 = 1_764_547_200_000;
const MB: f64 = 1024.0 * 1024.0;

fn master(n: usize) -> String {
    format!("ESP32_BENCH_{n:06X}")
}

/// The readings of one batch ending at `end_ms`, `per_batch` of them, spread evenly.
fn batch(masters: &[String], start_ms: i64, per_batch: usize, n0: u64) -> Vec<Reading> {
    let per_series = MASTERS * SENSORS.len();
    (0..per_batch)
        .map(|i| {
            let n = n0 + i as u64;
            let series = (n % per_series as u64) as usize;
            let at = start_ms + (i as i64 * BATCH_MS) / per_batch as i64;
            Reading {
                device_id: masters[series / SENSORS.len()].clone(),
                sensor_key: SENSORS[series % SENSORS.len()].to_string(),
                value: 6.0 + ((n * 7919) % 1000) as f64 / 1000.0,
                unit: None,
                recorded_at_ms: at,
                received_at_ms: Some(at + 15),
            }
        })
        .collect()
}

/// Pushes (deletes) everything in the outbox, as the push loop does when the backend answers.
fn push_outbox(store: &mut Store, now_ms: i64) -> anyhow::Result<usize> {
    let mut pushed = 0;
    loop {
        let seqs: Vec<i64> = store
            .outbox_due(now_ms, PUSH_BATCH)?
            .iter()
            .map(|r| r.seq)
            .collect();
        if seqs.is_empty() {
            return Ok(pushed);
        }
        pushed += seqs.len();
        store.outbox_delivered(&seqs)?;
    }
}

/// The database's size: its pages (what the file holds once the WAL is checkpointed) and the
/// files on disk now (database + WAL).
fn sizes(store: &Store, path: &Path) -> anyhow::Result<(u64, u64)> {
    let stats = store.history_stats()?;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let on_disk = std::fs::metadata(path)?.len() + std::fs::metadata(&wal).map_or(0, |m| m.len());
    Ok((stats.page_count * stats.page_size, on_disk))
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn main() -> anyhow::Result<()> {
    let rate = env_number("AUTOCORE_BENCH_RATE", 500, "readings per second")?;
    let minutes = env_number("AUTOCORE_BENCH_MINUTES", 60, "a whole number of minutes")?;
    let raw_rows_max = env_number("AUTOCORE_BENCH_RAW_ROWS_MAX", 600_000, "a row count")?;
    let outage_minutes = env_number("AUTOCORE_BENCH_OUTAGE_MINUTES", 10, "a whole number")?;
    let per_batch = (rate as i64 * BATCH_MS / 1000).max(1) as usize;
    let bounds = HistoryBounds {
        raw_hours: 168,
        raw_rows_max,
        rollup_days: 30,
        rollup_rows_max: 3_000_000,
        prune_rows_per_step: 20_000,
        vacuum_pages_per_step: 2_048,
    };
    let dir = tempfile::tempdir().context("a temp folder")?;
    let path = dir.path().join("agent.db");
    let mut store = Store::open(&path).context("opening the store")?;
    let masters: Vec<String> = (1..=MASTERS).map(master).collect();

    println!("# bench-history\n");
    println!("{}", machine_lines());
    println!("- data folder: {}", data_folder());
    println!("- load average before: {}", load_average());
    println!(
        "- {rate} readings/s ({MASTERS} masters x {} sensors), {minutes} simulated minutes, \
         batches of {per_batch} every {BATCH_MS} ms, a housekeeping step every {HOUSEKEEPING_MS} ms; \
         raw_rows_max {raw_rows_max}, prune_rows_per_step {}, vacuum_pages_per_step {}\n",
        SENSORS.len(),
        bounds.prune_rows_per_step,
        bounds.vacuum_pages_per_step
    );

    // ---- 1-3: the backend up, an hour of readings.
    let mut now = T0;
    let mut n = 0u64;
    let mut step_us = Vec::new();
    let mut pruning_step_us = Vec::new();
    let mut per_minute: Vec<(u64, u64, u64, u64, u64)> = Vec::new(); // minute, raw, rollups, pages bytes, disk
    let mut bound_reached_minute = None;
    let started = Instant::now();
    let batches_per_minute = 60_000 / BATCH_MS;
    for minute in 1..=minutes {
        for _ in 0..batches_per_minute {
            let readings = batch(&masters, now, per_batch, n);
            n += readings.len() as u64;
            now += BATCH_MS;
            store.enqueue_readings(&readings, now)?;
            push_outbox(&mut store, now)?;
            if now % HOUSEKEEPING_MS == 0 {
                let t = Instant::now();
                let step = store.history_step(&bounds, now)?;
                let us = t.elapsed().as_micros() as u64;
                step_us.push(us);
                if step.raw_deleted > 0 || step.pages_vacuumed > 0 {
                    pruning_step_us.push(us);
                    bound_reached_minute.get_or_insert(minute);
                }
            }
        }
        let stats = store.history_stats()?;
        let (pages, disk) = sizes(&store, &path)?;
        per_minute.push((minute, stats.raw_rows, stats.rollup_rows, pages, disk));
        ensure!(
            stats.raw_rows <= raw_rows_max + (rate * HOUSEKEEPING_MS as u64 / 1000),
            "the raw table exceeded its bound: {} rows",
            stats.raw_rows
        );
    }
    let elapsed = started.elapsed();
    println!(
        "{n} readings written in {:.1} s of wall time ({:.0} readings/s, {:.0}x real time)\n",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        (minutes * 60) as f64 / elapsed.as_secs_f64()
    );
    println!(
        "| simulated minute | raw rows | rollup rows | database (pages) MB | on disk (db + WAL) MB |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for (minute, raw, rollups, pages, disk) in &per_minute {
        if *minute == 1 || minute % 5 == 0 {
            println!(
                "| {minute} | {raw} | {rollups} | {:.1} | {:.1} |",
                *pages as f64 / MB,
                *disk as f64 / MB
            );
        }
    }
    let growth = |from: usize, to: usize| -> f64 {
        let (a, b) = (&per_minute[from], &per_minute[to]);
        (b.3 as f64 - a.3 as f64) / MB / (b.0 - a.0).max(1) as f64
    };
    let reached = bound_reached_minute.unwrap_or(minutes) as usize;
    println!();
    if reached > 2 {
        println!(
            "- growth before the raw bound (minutes 1..{}): {:.2} MB per simulated minute",
            reached - 1,
            growth(0, reached - 2)
        );
    }
    if per_minute.len() > reached + 5 {
        println!(
            "- growth under the bound (minutes {}..{minutes}): {:.3} MB per simulated minute \
             (the rollups and the free pages kept)",
            reached + 5,
            growth(reached + 4, per_minute.len() - 1)
        );
    }
    store.checkpoint()?;
    let steady = std::fs::metadata(&path)?.len();
    let stats = store.history_stats()?;
    let (raw_bytes, rollup_bytes) = store.history_bytes()?;
    println!(
        "- steady state at minute {minutes}: file {:.1} MB after a checkpoint; raw rows {} \
         ({:.1} MB, {:.0} bytes a row, index included); rollups {} ({:.1} MB, {:.0} bytes a row)",
        steady as f64 / MB,
        stats.raw_rows,
        raw_bytes as f64 / MB,
        raw_bytes as f64 / stats.raw_rows.max(1) as f64,
        stats.rollup_rows,
        rollup_bytes as f64 / MB,
        rollup_bytes as f64 / stats.rollup_rows.max(1) as f64
    );
    println!(
        "- one housekeeping step, all {} steps: p50 {} ms, p99 {} ms, max {} ms",
        step_us.len(),
        ms(percentile(&step_us, 0.5).unwrap_or(0)),
        ms(percentile(&step_us, 0.99).unwrap_or(0)),
        ms(step_us.iter().copied().max().unwrap_or(0))
    );
    println!(
        "- one housekeeping step that pruned or vacuumed ({} steps): p50 {} ms, p99 {} ms, max {} ms",
        pruning_step_us.len(),
        ms(percentile(&pruning_step_us, 0.5).unwrap_or(0)),
        ms(percentile(&pruning_step_us, 0.99).unwrap_or(0)),
        ms(pruning_step_us.iter().copied().max().unwrap_or(0))
    );

    // ---- 4: an outage, then the drain.
    for _ in 0..outage_minutes * batches_per_minute as u64 {
        let readings = batch(&masters, now, per_batch, n);
        n += readings.len() as u64;
        now += BATCH_MS;
        store.enqueue_readings(&readings, now)?;
        if now % HOUSEKEEPING_MS == 0 {
            store.history_step(&bounds, now)?;
        }
    }
    let waiting = store.outbox_stats(now)?.depth;
    store.checkpoint()?;
    let before = std::fs::metadata(&path)?.len();
    let t = Instant::now();
    let pushed = push_outbox(&mut store, now)?;
    let drain_s = t.elapsed().as_secs_f64();
    store.checkpoint()?;
    let drained = std::fs::metadata(&path)?.len();
    let free_after_drain = store.history_stats()?.freelist_pages;
    let mut drain_steps = Vec::new();
    let t = Instant::now();
    loop {
        now += HOUSEKEEPING_MS;
        let s = Instant::now();
        let step = store.history_step(&bounds, now)?;
        drain_steps.push(s.elapsed().as_micros() as u64);
        if !step.more {
            break;
        }
    }
    let give_back_s = t.elapsed().as_secs_f64();
    store.checkpoint()?;
    let after = std::fs::metadata(&path)?.len();
    println!(
        "- outage of {outage_minutes} simulated minutes: {waiting} rows waited in the outbox; file \
         {:.1} MB before the drain; {pushed} rows pushed in {drain_s:.1} s; file {:.1} MB right after \
         the drain ({free_after_drain} free pages); {} housekeeping steps ({give_back_s:.1} s of wall \
         time, {:.0} s of agent time at one step per {} s; step p50 {} ms, p99 {} ms, max {} ms) \
         gave them back: file {:.1} MB",
        before as f64 / MB,
        drained as f64 / MB,
        drain_steps.len(),
        drain_steps.len() as f64 * HOUSEKEEPING_MS as f64 / 1000.0,
        HOUSEKEEPING_MS / 1000,
        ms(percentile(&drain_steps, 0.5).unwrap_or(0)),
        ms(percentile(&drain_steps, 0.99).unwrap_or(0)),
        ms(drain_steps.iter().copied().max().unwrap_or(0)),
        after as f64 / MB
    );
    ensure!(after < drained, "the file did not shrink after the drain");
    println!("- load average after: {}", load_average());
    Ok(())
}
