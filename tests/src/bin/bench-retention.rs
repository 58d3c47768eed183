//! `bench-retention`: the cloud side of issue 16. Starts a durable backend, unschedules the
//! pg_cron jobs (the bench runs them itself), bulk-loads `AUTOCORE_BENCH_DAYS` days of readings
//! at 1 Hz for `AUTOCORE_BENCH_MASTERS` masters × `AUTOCORE_BENCH_SENSORS` sensors in SQL
//! (generate_series), runs the first rollup, then in the same run:
//!
//! 1. a week's chart of one sensor (7 days, 1-hour points) from `telemetry_rollup_1h` and from raw
//!    `telemetry_data`, both as the owner's `authenticated` JWT under RLS, interleaved,
//!    `AUTOCORE_BENCH_QUERIES` times each (default 20): median, p95, ratio; the two answers are
//!    compared point by point;
//! 2. the steady-state minute rollup: a minute of new readings for every sensor, then
//!    `private.telemetry_rollup_1m()`, five times;
//! 3. retention: rule firings and emergency stops inserted as flight-recorder anchors, table
//!    sizes and rows before, `private.telemetry_retention()` timed, sizes after and after
//!    VACUUM, then retention again (it should find nothing) timed.
//!
//! Environment: `AUTOCORE_BENCH_MASTERS` (default 10), `AUTOCORE_BENCH_SENSORS` (default 10),
//! `AUTOCORE_BENCH_DAYS` (default 8, at least 8 so that retention has a day to delete),
//! `AUTOCORE_BENCH_QUERIES` (default 20).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use autocore_stack::bench::{data_folder, env_number, load_average, machine_lines, percentile};
use autocore_stack::{PostgresOptions, Stack, StackOptions};
use tokio_postgres::Client;
use uuid::Uuid;

const OWNER: Uuid = Uuid::from_u128(0xbe000000_0000_0000_0000_0000000016be);
const AGENT: &str = "bench-retention-agent";
/// Readings the load leaves out before its start time, so the steady state has minutes to add.
const STEADY_MINUTES: i64 = 5;
/// The tables whose size and rows are reported around retention.
const TABLES: [&str; 7] = [
    "public.telemetry_data",
    "public.telemetry_rollup_1m",
    "public.telemetry_rollup_1h",
    "public.flight_recordings",
    "public.flight_recorder_readings",
    "public.rule_executions",
    "public.event_logs",
];

fn main() -> anyhow::Result<()> {
    let masters = env_number("AUTOCORE_BENCH_MASTERS", 10, "a whole number")?;
    let sensors = env_number("AUTOCORE_BENCH_SENSORS", 10, "a whole number")?;
    let days = env_number("AUTOCORE_BENCH_DAYS", 8, "a whole number of days")?;
    ensure!(
        days >= 8,
        "AUTOCORE_BENCH_DAYS must be at least 8 (7 days are kept; retention needs more)"
    );
    let queries = env_number("AUTOCORE_BENCH_QUERIES", 20, "a whole number")?;

    eprintln!("bench-retention: starting a durable backend (Postgres 15 + pg_cron + PostgREST 12)");
    // On the main thread: the services die with the thread that started them.
    let stack = Stack::start(StackOptions {
        backend: true,
        mqtt: false,
        broker: autocore_stack::Security::Secured,
        postgres: PostgresOptions {
            durable: true,
            max_connections: 100,
        },
    })
    .context("starting the durable backend stack")?;
    let pg_url = stack.pg_url()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(run(&pg_url, masters, sensors, days, queries))
}

async fn run(
    pg_url: &str,
    masters: u64,
    sensors: u64,
    days: u64,
    queries: u64,
) -> anyhow::Result<()> {
    let (db, connection) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls)
        .await
        .context("connecting to Postgres")?;
    tokio::spawn(connection);

    println!("## Machine\n\n{}", machine_lines());
    println!("- data folder: {}", data_folder());
    println!("load average before: {}\n", load_average());

    // The bench runs the jobs itself: a scheduled run in the middle would blur the timings.
    let unscheduled = db
        .query(
            "select jobname::text, cron.unschedule(jobid) from cron.job
              where jobname like 'autocore-telemetry-%' order by jobname",
            &[],
        )
        .await
        .context("unscheduling the pg_cron jobs (is pg_cron loaded?)")?;
    ensure!(
        unscheduled.len() == 3,
        "expected the three autocore-telemetry-* pg_cron jobs, found {}",
        unscheduled.len()
    );
    // Bulk loading with checkpoints every 1 GB of WAL spends most of its time in full-page
    // writes; a larger max_wal_size is what a database taking a backfill would be given.
    db.batch_execute("alter system set max_wal_size = '4GB'")
        .await
        .context("raising max_wal_size for the load")?;
    db.batch_execute("select pg_reload_conf()").await?;
    println!("## Postgres\n\n{}\n", postgres_settings(&db).await?);
    println!(
        "Scale: {masters} masters × {sensors} sensors × {days} days at 1 Hz = {} readings; \
         pg_cron jobs unscheduled for the run ({}).\n",
        masters * sensors * days * 86_400,
        unscheduled
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join(", ")
    );

    setup_world(&db, masters).await?;
    let load = load_readings(&db, masters, sensors, days).await?;
    println!(
        "## Load\n\n{} readings in {:.1} s ({:.0} readings/s; INSERT … SELECT generate_series, one statement per master and day)\n",
        load.rows,
        load.wall.as_secs_f64(),
        load.rows as f64 / load.wall.as_secs_f64()
    );

    let first_rollup_started = Instant::now();
    let (first_1m, wall_1m) = timed_json(&db, "select private.telemetry_rollup_1m()").await?;
    let (first_1h, wall_1h) = timed_json(&db, "select private.telemetry_rollup_1h()").await?;
    db.batch_execute("analyze public.telemetry_rollup_1m, public.telemetry_rollup_1h")
        .await?;
    println!("## First rollup (everything loaded)\n");
    println!("- minutes: {:.1} s, {first_1m}", wall_1m.as_secs_f64());
    println!("- hours: {:.1} s, {first_1h}\n", wall_1h.as_secs_f64());

    chart(&db, queries, &load).await?;
    steady_state(&db, masters, sensors, &load, first_rollup_started).await?;
    retention(&db, masters, days, &load).await?;
    println!("load average after: {}", load_average());
    Ok(())
}

async fn setup_world(db: &Client, masters: u64) -> anyhow::Result<()> {
    db.batch_execute(&format!(
        "insert into auth.users (id, email) values ('{OWNER}', 'bench-retention@example.com');
         insert into public.edge_agents (agent_id, owner_id) values ('{AGENT}', '{OWNER}');
         insert into public.device_status (device_id, owner_id, agent_id)
         select 'bench-master-' || m, '{OWNER}', '{AGENT}' from generate_series(1, {masters}) m;"
    ))
    .await
    .context("creating the bench owner, agent and masters")
}

struct Load {
    rows: u64,
    wall: Duration,
    /// The first second the load left out: the steady state adds minutes from here.
    end_epoch: i64,
}

/// Readings at 1 Hz up to `STEADY_MINUTES` before now, one statement per master and day.
async fn load_readings(db: &Client, masters: u64, sensors: u64, days: u64) -> anyhow::Result<Load> {
    let now: i64 = db
        .query_one(
            "select extract(epoch from date_trunc('minute', now(), 'UTC'))::bigint",
            &[],
        )
        .await?
        .get(0);
    let end_epoch = now - STEADY_MINUTES * 60;
    let start_epoch = end_epoch - days as i64 * 86_400;
    let started = Instant::now();
    let mut rows = 0u64;
    for m in 1..=masters {
        for d in 0..days as i64 {
            let day_start = start_epoch + d * 86_400;
            let n = db
                .execute(
                    &format!(
                        "insert into public.telemetry_data (device_id, sensor_key, value, unit, recorded_at)
                         select 'bench-master-{m}', 's' || s,
                                20 + 5 * sin((i + 977 * s) / 3600.0) + ((i * 7919 + s * 104729) % 1000) / 1000.0,
                                'u', to_timestamp({day_start} + i)
                           from generate_series(0, {sensors} - 1) s, generate_series(0, 86399) i"
                    ),
                    &[],
                )
                .await
                .with_context(|| format!("loading master {m}, day {d}"))?;
            rows += n;
        }
        eprintln!(
            "bench-retention: loaded master {m}/{masters} ({rows} readings, {:.0} s)",
            started.elapsed().as_secs_f64()
        );
    }
    db.batch_execute("analyze public.telemetry_data").await?;
    Ok(Load {
        rows,
        wall: started.elapsed(),
        end_epoch,
    })
}

/// The week's chart both ways, interleaved, as the owner under RLS.
async fn chart(db: &Client, queries: u64, load: &Load) -> anyhow::Result<()> {
    let rollup_sql = "select extract(epoch from bucket)::bigint, min_value, max_value, avg_value, sample_count::bigint
                        from public.telemetry_rollup_1h
                       where device_id = $1 and sensor_key = $2 and bucket >= $3 and bucket < $4
                       order by bucket";
    let raw_sql = "select extract(epoch from date_trunc('hour', recorded_at, 'UTC'))::bigint as bucket,
                          min(value), max(value), avg(value), count(*)
                     from public.telemetry_data
                    where device_id = $1 and sensor_key = $2 and recorded_at >= $3 and recorded_at < $4
                    group by 1 order by 1";
    let rollup = db.prepare(rollup_sql).await?;
    let raw = db.prepare(raw_sql).await?;
    // The week of whole hours before the load's end, all of them loaded and rolled up.
    let (from, to): (std::time::SystemTime, std::time::SystemTime) = {
        let row = db
            .query_one(
                "select date_trunc('hour', to_timestamp($1::bigint), 'UTC') - interval '7 days',
                        date_trunc('hour', to_timestamp($1::bigint), 'UTC')",
                &[&load.end_epoch],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    let claims = serde_json::json!({"sub": OWNER.to_string(), "role": "authenticated"}).to_string();
    let device = "bench-master-1";
    let sensor = "s0";

    let mut rollup_us = Vec::new();
    let mut raw_us = Vec::new();
    let mut answers = (Vec::new(), Vec::new());
    // One warm-up of each, then the timed rounds.
    for round in 0..=queries {
        for (which, statement) in [(0, &rollup), (1, &raw)] {
            db.batch_execute(&format!(
                "begin; set local role authenticated; select set_config('request.jwt.claims', '{claims}', true)"
            ))
            .await?;
            let started = Instant::now();
            let rows = db
                .query(statement, &[&device, &sensor, &from, &to])
                .await
                .context("the chart query")?;
            let us = started.elapsed().as_micros() as u64;
            db.batch_execute("commit").await?;
            if round > 0 {
                if which == 0 {
                    rollup_us.push(us);
                } else {
                    raw_us.push(us);
                }
            } else {
                let points: Vec<(i64, f64, f64, f64, i64)> = rows
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
                    .collect();
                if which == 0 {
                    answers.0 = points;
                } else {
                    answers.1 = points;
                }
            }
        }
    }
    let (from_rollup, from_raw) = answers;
    ensure!(
        from_rollup.len() == 168,
        "the rollup chart has {} points, not 168",
        from_rollup.len()
    );
    ensure!(
        from_rollup.len() == from_raw.len(),
        "the rollup chart has {} points, the raw one {}",
        from_rollup.len(),
        from_raw.len()
    );
    for (a, b) in from_rollup.iter().zip(&from_raw) {
        ensure!(
            a.0 == b.0 && a.1 == b.1 && a.2 == b.2 && a.4 == b.4 && (a.3 - b.3).abs() < 1e-9,
            "the rollup and raw charts differ: {a:?} vs {b:?}"
        );
    }
    let ms = |v: &[u64], p: f64| percentile(v, p).map_or(f64::NAN, |us| us as f64 / 1000.0);
    let (rollup_median, raw_median) = (ms(&rollup_us, 0.5), ms(&raw_us, 0.5));
    println!(
        "## Week chart: {device}/{sensor}, 7 days, 1-hour points, as the owner's JWT under RLS\n"
    );
    println!(
        "{} points each, identical (min, max, count; avg within 1e-9); {queries} timed queries each, interleaved, after one warm-up.\n",
        from_rollup.len()
    );
    println!("| source | median ms | p95 ms | max ms |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| telemetry_rollup_1h | {rollup_median:.2} | {:.2} | {:.2} |",
        ms(&rollup_us, 0.95),
        ms(&rollup_us, 1.0)
    );
    println!(
        "| telemetry_data (raw, grouped by hour) | {raw_median:.2} | {:.2} | {:.2} |",
        ms(&raw_us, 0.95),
        ms(&raw_us, 1.0)
    );
    println!(
        "\nrollup is {:.0}× faster (median over median)\n",
        raw_median / rollup_median
    );
    Ok(())
}

/// A minute of new readings for every sensor, then the minute rollup, five times.
async fn steady_state(
    db: &Client,
    masters: u64,
    sensors: u64,
    load: &Load,
    first_rollup_started: Instant,
) -> anyhow::Result<()> {
    println!(
        "## Steady-state minute rollup ({masters} × {sensors} sensors, one new minute of readings before each run)\n"
    );
    // Readings received less than a minute before the first rollup started are looked at again
    // by the next run (the watermark's one-minute floor): that catch-up is shown, not timed as
    // steady state. A minute after the first rollup began, the steady runs after it see none of
    // the load again.
    tokio::time::sleep(Duration::from_secs(61).saturating_sub(first_rollup_started.elapsed()))
        .await;
    let (settle, settle_wall) = timed_json(db, "select private.telemetry_rollup_1m()").await?;
    println!(
        "Catch-up run first (the readings received within a minute before the first rollup): {:.1} ms, {settle}\n",
        settle_wall.as_secs_f64() * 1000.0
    );
    println!("| run | new readings | ms | result |");
    println!("| --- | --- | --- | --- |");
    for k in 0..STEADY_MINUTES {
        let minute = load.end_epoch + k * 60;
        let n = db
            .execute(
                &format!(
                    "insert into public.telemetry_data (device_id, sensor_key, value, unit, recorded_at)
                     select 'bench-master-' || m, 's' || s, 20 + i / 60.0, 'u', to_timestamp({minute} + i)
                       from generate_series(1, {masters}) m, generate_series(0, {sensors} - 1) s,
                            generate_series(0, 59) i"
                ),
                &[],
            )
            .await?;
        let (result, wall) = timed_json(db, "select private.telemetry_rollup_1m()").await?;
        println!(
            "| {} | {n} | {:.1} | {result} |",
            k + 1,
            wall.as_secs_f64() * 1000.0
        );
    }
    println!();
    Ok(())
}

async fn retention(db: &Client, masters: u64, days: u64, load: &Load) -> anyhow::Result<()> {
    // Anchors: a rule firing per master at noon of every loaded day, and two emergency stops of
    // the agent: one on the first day (its window is copied, then deleted with the day's raw
    // readings) and one in the kept week (nothing to copy yet).
    let start = load.end_epoch - days as i64 * 86_400;
    db.batch_execute(&format!(
        "insert into public.rule_executions (client_id, agent_id, device_id, rule_uuid, rule_id, priority,
                                             executed_at, result, explanation)
         select gen_random_uuid(), '{AGENT}', 'bench-master-' || m, gen_random_uuid(), 'R1', 50,
                to_timestamp({start} + d * 86400 + 43200), 'executed', 'bench'
           from generate_series(1, {masters}) m, generate_series(0, {days} - 1) d;
         insert into public.event_logs (agent_id, event_type, severity, source, message, occurred_at)
         values ('{AGENT}', 'emergency_stop', 'critical', 'agent', 'bench stop', to_timestamp({start} + 3600)),
                ('{AGENT}', 'emergency_stop', 'critical', 'agent', 'bench stop', to_timestamp({start} + ({days} - 2) * 86400));"
    ))
    .await
    .context("inserting the flight-recorder anchors")?;
    db.batch_execute("checkpoint").await?;

    println!(
        "## Retention ({masters} masters, {days} days loaded; defaults: raw 7 days, events 30, minute rollups 30)\n"
    );
    let before = table_sizes(db).await?;
    let (first, first_wall) = timed_json(db, "select private.telemetry_retention()").await?;
    let after = table_sizes(db).await?;
    let vacuum_started = Instant::now();
    db.batch_execute(&format!("vacuum (analyze) {}", TABLES.join(", ")))
        .await?;
    let vacuum_wall = vacuum_started.elapsed();
    let vacuumed = table_sizes(db).await?;
    let (second, second_wall) = timed_json(db, "select private.telemetry_retention()").await?;

    println!(
        "First run: {:.1} s\n\n```\n{first}\n```\n",
        first_wall.as_secs_f64()
    );
    println!("| table | rows before | MB before | rows after | MB after | MB after VACUUM |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for ((b, a), v) in before.iter().zip(&after).zip(&vacuumed) {
        println!(
            "| {} | {} | {:.1} | {} | {:.1} | {:.1} |",
            b.0,
            b.1,
            b.2 as f64 / 1e6,
            a.1,
            a.2 as f64 / 1e6,
            v.2 as f64 / 1e6
        );
    }
    println!(
        "\nVACUUM (ANALYZE) of these tables: {:.1} s (it frees the deleted rows' space for reuse; the files do not shrink)\n",
        vacuum_wall.as_secs_f64()
    );
    println!(
        "Second run (nothing to delete): {:.1} ms\n\n```\n{second}\n```\n",
        second_wall.as_secs_f64() * 1000.0
    );
    Ok(())
}

/// (table, rows, pg_total_relation_size bytes) for each of `TABLES`.
async fn table_sizes(db: &Client) -> anyhow::Result<Vec<(String, i64, i64)>> {
    let mut sizes = Vec::new();
    for table in TABLES {
        let row = db
            .query_one(
                &format!("select count(*), pg_total_relation_size('{table}') from {table}"),
                &[],
            )
            .await
            .with_context(|| format!("measuring {table}"))?;
        sizes.push((table.to_string(), row.get(0), row.get(1)));
    }
    Ok(sizes)
}

/// Runs a statement returning one jsonb (as text) and times it.
async fn timed_json(db: &Client, sql: &str) -> anyhow::Result<(String, Duration)> {
    let started = Instant::now();
    let row = db
        .query_one(&format!("select ({sql})::text"), &[])
        .await
        .with_context(|| format!("running {sql}"))?;
    Ok((row.get(0), started.elapsed()))
}

async fn postgres_settings(db: &Client) -> anyhow::Result<String> {
    let rows = db
        .query(
            "select version() union all
             select name || ' = ' || setting || coalesce(' ' || unit, '') from pg_settings
              where name in ('shared_buffers', 'work_mem', 'maintenance_work_mem', 'fsync',
                             'synchronous_commit', 'full_page_writes', 'max_wal_size', 'jit',
                             'shared_preload_libraries', 'cron.use_background_workers')",
            &[],
        )
        .await
        .context("reading the Postgres settings")?;
    Ok(rows
        .iter()
        .map(|r| format!("- {}", r.get::<_, String>(0)))
        .collect::<Vec<_>>()
        .join("\n"))
}
