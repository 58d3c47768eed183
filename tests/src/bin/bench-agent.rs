//! `bench-agent`: the edge agent's benchmarks of issue 5 (item 9). Starts a durable backend
//! (Postgres 15 + PostgREST 12) and Mosquitto on loopback, loads sql/bench/setup.sql (one owner,
//! the agent `bench-agent`, masters `bench-master-1..=50`), and measures, each figure beside a
//! baseline measured in the same run:
//!
//! 1. telemetry ingest: readings/s from MQTT into the agent's SQLite outbox, against a bare
//!    `Store::enqueue_readings` of the same rows in batches of `telemetry_batch_rows_max`;
//! 2. backlog drain: time until an outbox of `AUTOCORE_BENCH_READINGS` readings (default 864,000:
//!    10 masters, 24 h at 1 Hz) is pushed to PostgREST, against a bare bulk push of the same rows
//!    with the same batch size and the same JWT;
//! 3. command latency: dashboard insert through PostgREST to `completed` in the cloud, with the
//!    simulator acking, against a bare insert + lock RPC + complete RPC round trip;
//! 4. resident memory and CPU of the agent as a child process (`autocore-agent-under-test`, built
//!    beside this binary) with 50 simulated masters × 10 sensors at 1 Hz, then idle.
//!
//! Environment (all optional): `AUTOCORE_BENCH_READINGS` (backlog, default 864000),
//! `AUTOCORE_BENCH_INGEST_READINGS` (default 500000), `AUTOCORE_BENCH_INGEST_RATE` (readings/s
//! offered over MQTT, default 100000), `AUTOCORE_BENCH_COMMANDS` (default 100),
//! `AUTOCORE_BENCH_LOAD_SECONDS` (default 30), `AUTOCORE_BENCH_IDLE_SECONDS` (default 30).

use autocore_stack::bench::{InProcessAgent, env_number, health, percentile, wait_for_health};
use autocore_stack::bench::{clock_ticks_per_second, cpu_ticks, free_port, memory_kb};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use autocore_agent::config::AgentConfig;
use autocore_agent::store::{Reading, Store};
use autocore_stack::postgres::DATABASE;
use autocore_stack::process::{ManagedProcess, ProcessSpec};
use autocore_stack::{Claims, Postgres, PostgresOptions, Stack, StackOptions, repo_root};
use firmware_protocol::message::RelayLimits;
use firmware_protocol::sim::{
    self, MasterSpec, MasterTiming, RadioSpec, SensorSource, SensorSpec, SimConfig, SlaveSpec,
    rumqttc,
};
use firmware_protocol::{DeviceId, MasterKey};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use uuid::Uuid;

/// The bench owner and agent of sql/bench/setup.sql.
const BENCH_OWNER: Uuid = Uuid::from_u128(0xbe000000_0000_0000_0000_00000000be01);
const BENCH_AGENT: &str = "bench-agent";
/// The signing key every simulated master shares with the agent.
const KEY_HEX: &str = "9a1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
const SLAVE: &str = "14:33:5C:38:BF:60";
/// Masters whose telemetry the ingest and drain benchmarks carry.
const DATA_MASTERS: usize = 10;
/// Sensors per telemetry payload in the ingest benchmark and per master in the memory one.
const SENSORS_PER_PAYLOAD: usize = 10;
/// Masters the simulator plays in the memory benchmark.
const MEMORY_MASTERS: usize = 50;
/// A master for the bare command round trip that no agent of this run polls.
const BARE_MASTER: &str = "bench-master-50";
/// A step of the ingest pacer: payloads due in this slice are published together.
const PACE_SLICE: Duration = Duration::from_millis(5);

fn master(n: usize) -> String {
    format!("bench-master-{n}")
}

/// What the benchmarks share: the stack's addresses and tokens.
struct Ctx {
    rest: String,
    mqtt: String,
    pg_url: String,
    agent_jwt: String,
    user_jwt: String,
    http: reqwest::Client,
    logins: autocore_stack::bench::BenchLogins,
}

/// One line of the summary table.
struct Figure {
    name: String,
    agent: String,
    baseline: String,
    ratio: String,
    target: String,
    met: Option<bool>,
}

fn main() -> anyhow::Result<()> {
    let backlog = env_number("AUTOCORE_BENCH_READINGS", 864_000, "a whole number")?;
    let ingest_readings = env_number("AUTOCORE_BENCH_INGEST_READINGS", 500_000, "a whole number")?;
    let ingest_rate = env_number("AUTOCORE_BENCH_INGEST_RATE", 100_000, "a whole number")?;
    let commands = env_number("AUTOCORE_BENCH_COMMANDS", 100, "a whole number")?;
    let load_seconds = env_number("AUTOCORE_BENCH_LOAD_SECONDS", 30, "a whole number")?;
    let idle_seconds = env_number("AUTOCORE_BENCH_IDLE_SECONDS", 30, "a whole number")?;
    let agent_exe = agent_under_test()?;

    eprintln!("bench-agent: starting a durable backend (Postgres 15 + PostgREST 12) and Mosquitto");
    // On the main thread: the services (and the agent child) die with the thread that started them.
    let stack = Stack::start(StackOptions {
        backend: true,
        mqtt: true,
        broker: autocore_stack::Security::Secured,
        postgres: PostgresOptions {
            durable: true,
            max_connections: 100,
        },
    })
    .context("starting the stack")?;
    let pg = stack.postgres().context("the stack has no Postgres")?;
    pg.psql(
        DATABASE,
        &[
            "-f",
            &repo_root()
                .join("sql/bench/setup.sql")
                .display()
                .to_string(),
        ],
    )
    .context("applying sql/bench/setup.sql")?;
    let ctx = Ctx {
        rest: stack.rest_url().context("the stack has no PostgREST")?,
        mqtt: stack.mqtt_url().context("the stack has no Mosquitto")?,
        pg_url: pg.url(),
        agent_jwt: stack.token(&Claims::agent(BENCH_OWNER, BENCH_AGENT)),
        user_jwt: stack.token(&Claims::user(BENCH_OWNER)),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(16)
            .build()
            .context("building the HTTP client")?,
        logins: autocore_stack::bench::bench_logins(
            &stack,
            BENCH_AGENT,
            &(1..=MEMORY_MASTERS).map(master).collect::<Vec<_>>(),
            KEY_HEX,
            &["bench-load"],
        )?,
    };
    let defaults = AgentConfig::from_toml(
        &agent_toml(&ctx, Path::new("/nonexistent.db"), "127.0.0.1:0", &[]),
        Path::new("bench-agent.toml"),
        std::iter::empty(),
    )
    .context("parsing the agent's default configuration")?;
    let batch_rows = defaults.store.telemetry_batch_rows_max;
    let push_rows = defaults.cloud.push_batch_rows_max;
    let poll_ms = defaults.cloud.poll_interval_ms;

    println!("## Machine\n\n{}", machine_description());
    println!(
        "load average before: {}\n",
        autocore_stack::bench::load_average()
    );
    println!(
        "Agent defaults: telemetry_batch_rows_max = {batch_rows}, telemetry_flush_ms = {}, push_batch_rows_max = {push_rows}, poll_interval_ms = {poll_ms}; SQLite WAL, synchronous=FULL; Postgres durable (fsync, synchronous_commit on).\n",
        defaults.store.telemetry_flush_ms
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let mut figures = Vec::new();

    eprintln!("bench-agent: 1/4 telemetry ingest");
    figures.extend(
        bench_ingest(&runtime, &ctx, ingest_readings, ingest_rate, batch_rows)
            .context("the ingest benchmark")?,
    );
    eprintln!("bench-agent: 2/4 backlog drain of {backlog} readings");
    figures.extend(
        bench_drain(&runtime, &ctx, pg, backlog, push_rows, batch_rows)
            .context("the drain benchmark")?,
    );
    eprintln!("bench-agent: 3/4 command latency over {commands} commands");
    figures.extend(
        runtime
            .block_on(bench_commands(&ctx, commands, poll_ms))
            .context("the command latency benchmark")?,
    );
    eprintln!("bench-agent: 4/4 memory and CPU of the agent process");
    figures.extend(
        bench_memory(&runtime, &ctx, &agent_exe, load_seconds, idle_seconds)
            .context("the memory benchmark")?,
    );

    println!(
        "load average after: {}\n",
        autocore_stack::bench::load_average()
    );
    println!("## Figures\n");
    println!("| figure | agent | baseline (same run) | agent / baseline | target | met |");
    println!("| --- | ---: | ---: | ---: | --- | --- |");
    for f in &figures {
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "| {} | {} | {} | {} | {} | {met} |",
            f.name, f.agent, f.baseline, f.ratio, f.target
        );
    }
    drop(runtime);
    drop(stack);
    Ok(())
}

/// `autocore-agent-under-test`, built by Cargo beside this binary.
fn agent_under_test() -> anyhow::Result<PathBuf> {
    autocore_stack::bench::binary_beside_this_one(
        "autocore-agent-under-test",
        "build it first with `cargo build --release -p autocore-stack --bins` (or run this benchmark with `cargo run --release -p autocore-stack --bin bench-agent`, which builds every binary of the package)",
    )
}

/// The agent's configuration for this run: defaults everywhere but the addresses.
fn agent_toml(ctx: &Ctx, db: &Path, api_listen: &str, masters: &[String]) -> String {
    let mut toml = format!(
        r#"
[agent]
id = "{BENCH_AGENT}"
[store]
path = "{db}"
[cloud]
rest_url = "{rest}"
jwt = "{jwt}"
[mqtt]
url = "{mqtt}"
{login}[api]
listen = "{api_listen}"
"#,
        db = db.display(),
        rest = ctx.rest,
        jwt = ctx.agent_jwt,
        mqtt = ctx.mqtt,
        login = ctx.logins.agent_toml(),
    );
    for m in masters {
        toml.push_str(&format!(
            "[[masters]]\ndevice_id = \"{m}\"\nkey = \"{KEY_HEX}\"\n"
        ));
    }
    toml
}

async fn start_agent(ctx: &Ctx, db: &Path, masters: &[String]) -> anyhow::Result<InProcessAgent> {
    let config = AgentConfig::from_toml(
        &agent_toml(ctx, db, "127.0.0.1:0", masters),
        Path::new("bench-agent.toml"),
        std::iter::empty(),
    )
    .context("the agent's configuration")?;
    InProcessAgent::start(config, &ctx.http).await
}

/// The value of one unlabelled metric from GET /metrics.
async fn metric(http: &reqwest::Client, api: &str, name: &str) -> anyhow::Result<f64> {
    let text = http
        .get(format!("{api}/metrics"))
        .send()
        .await
        .context("GET /metrics")?
        .text()
        .await
        .context("reading /metrics")?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no metric {name} in /metrics"))
}

// ------------------------------------------------------------------------------------- ingest

/// One telemetry payload in the protocol's shape, with `SENSORS_PER_PAYLOAD` sensors.
fn telemetry_payload(ts_ms: i64, seed: usize) -> String {
    let mut payload = serde_json::Map::new();
    payload.insert("v".into(), json!(1));
    payload.insert("ts_ms".into(), json!(ts_ms));
    for s in 0..SENSORS_PER_PAYLOAD {
        payload.insert(
            format!("s{s}"),
            json!({"value": 20.0 + ((seed + s) % 100) as f64 / 10.0, "unit": "C"}),
        );
    }
    Value::Object(payload).to_string()
}

/// The readings of payload `i` of the ingest load: master `i % 10`, time `base + i / 10` ms.
fn ingest_readings_of(i: usize, base_ts: i64) -> (String, i64, Vec<Reading>) {
    let device = master(i % DATA_MASTERS + 1);
    let ts = base_ts + (i / DATA_MASTERS) as i64;
    let readings = (0..SENSORS_PER_PAYLOAD)
        .map(|s| Reading {
            device_id: device.clone(),
            sensor_key: format!("s{s}"),
            value: 20.0 + ((i + s) % 100) as f64 / 10.0,
            unit: Some("C".into()),
            recorded_at_ms: ts,
            received_at_ms: None,
        })
        .collect();
    (device, ts, readings)
}

fn bench_ingest(
    runtime: &tokio::runtime::Runtime,
    ctx: &Ctx,
    readings_total: u64,
    rate: u64,
    batch_rows: usize,
) -> anyhow::Result<Vec<Figure>> {
    let payloads = (readings_total as usize).div_ceil(SENSORS_PER_PAYLOAD);
    let readings_total = payloads * SENSORS_PER_PAYLOAD;
    let base_ts = autocore_agent::shared::now_ms() - 3_600_000;
    let dir = tempfile::Builder::new()
        .prefix("autocore-bench-ingest-")
        .tempdir()
        .context("a folder for the databases")?;

    // Baseline: the same rows through Store::enqueue_readings, in the agent's batch size.
    let rows: Vec<Reading> = (0..payloads)
        .flat_map(|i| ingest_readings_of(i, base_ts).2)
        .collect();
    let mut bare = Store::open(&dir.path().join("bare.db")).context("opening the bare store")?;
    let started = Instant::now();
    let mut stored = 0;
    for chunk in rows.chunks(batch_rows) {
        stored += bare
            .enqueue_readings(chunk, autocore_agent::shared::now_ms())
            .context("bare enqueue_readings")?;
    }
    let bare_wall = started.elapsed();
    ensure!(
        stored == readings_total,
        "the bare insert stored {stored} of {readings_total}"
    );
    drop(bare);
    drop(rows);
    let bare_rate = readings_total as f64 / bare_wall.as_secs_f64();
    eprintln!(
        "bench-agent:   bare enqueue_readings: {readings_total} readings in {:.2} s = {bare_rate:.0}/s",
        bare_wall.as_secs_f64()
    );

    let (agent_rate, wall, dropped) = runtime.block_on(async {
        let masters: Vec<String> = (1..=DATA_MASTERS).map(master).collect();
        let agent = start_agent(ctx, &dir.path().join("agent.db"), &masters).await?;
        let options = ctx.logins.tool_options(&ctx.mqtt, "bench-load")?;
        let (client, mut eventloop) = sim::mqtt_client(options);
        let (ready_tx, ready) = oneshot::channel();
        let pump = tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .context("the load generator did not connect to Mosquitto")?
            .ok();
        // The agent subscribes with QoS 0: wait until one warm-up reading is stored.
        let warm_topic = format!("autocore/devices/{}/telemetry", master(1));
        let mut warm = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while metric(&ctx.http, &agent.api, "autocore_agent_readings_stored_total").await? < 1.0 {
            ensure!(
                Instant::now() < deadline,
                "the agent stored no warm-up reading in 30 s"
            );
            warm += 1;
            client
                .publish(
                    &warm_topic,
                    rumqttc::QoS::AtMostOnce,
                    false,
                    telemetry_payload(base_ts - 1_000_000 - warm, 0),
                )
                .await
                .context("publishing a warm-up payload")?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = metric(&ctx.http, &agent.api, "autocore_agent_readings_stored_total").await?;

        let messages: Vec<(String, String)> = (0..payloads)
            .map(|i| {
                let (device, ts, _) = ingest_readings_of(i, base_ts);
                (
                    format!("autocore/devices/{device}/telemetry"),
                    telemetry_payload(ts, i),
                )
            })
            .collect();
        let payload_rate = rate as f64 / SENSORS_PER_PAYLOAD as f64;
        let started = Instant::now();
        for (sent, (topic, payload)) in messages.into_iter().enumerate() {
            let due = started + Duration::from_secs_f64(sent as f64 / payload_rate);
            let now = Instant::now();
            if due > now + PACE_SLICE {
                tokio::time::sleep(due - now).await;
            }
            client
                .publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
                .await
                .context("publishing telemetry")?;
        }
        let published_in = started.elapsed();
        // Until every reading is stored, or nothing moved for 3 s.
        let mut last = before;
        let mut last_change = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now_stored =
                metric(&ctx.http, &agent.api, "autocore_agent_readings_stored_total").await?;
            if now_stored > last {
                last = now_stored;
                last_change = Instant::now();
            }
            if (last - before) as usize >= readings_total
                || last_change.elapsed() > Duration::from_secs(3)
            {
                break;
            }
        }
        let wall = last_change.duration_since(started);
        let stored = (last - before) as usize;
        eprintln!(
            "bench-agent:   published {readings_total} readings in {:.2} s; agent stored {stored} in {:.2} s",
            published_in.as_secs_f64(),
            wall.as_secs_f64()
        );
        pump.abort();
        agent.stop().await?;
        anyhow::Ok((
            stored as f64 / wall.as_secs_f64(),
            wall,
            readings_total - stored,
        ))
    })?;
    let ratio = agent_rate / bare_rate;
    Ok(vec![Figure {
        name: format!(
            "telemetry ingest, MQTT → SQLite ({readings_total} readings, {SENSORS_PER_PAYLOAD} per payload, {DATA_MASTERS} masters, offered at {rate}/s; {dropped} not stored)"
        ),
        agent: format!("{agent_rate:.0} readings/s ({:.2} s)", wall.as_secs_f64()),
        baseline: format!(
            "{bare_rate:.0} readings/s (bare `enqueue_readings`, batches of {batch_rows}, {:.2} s)",
            bare_wall.as_secs_f64()
        ),
        ratio: format!("{ratio:.2}"),
        target: "≥ 20,000 readings/s and ≥ 0.5".into(),
        met: Some(agent_rate >= 20_000.0 && ratio >= 0.5 && dropped == 0),
    }])
}

// ------------------------------------------------------------------------------------- drain

/// Reading `k` of the backlog: master `k % 10`, one sensor at 1 Hz over the last 24 h.
fn backlog_reading(k: usize, start_ms: i64) -> Reading {
    Reading {
        device_id: master(k % DATA_MASTERS + 1),
        sensor_key: "water_temp".into(),
        value: 18.0 + (k % 50) as f64 / 10.0,
        unit: Some("C".into()),
        recorded_at_ms: start_ms + (k / DATA_MASTERS) as i64 * 1000,
        received_at_ms: None,
    }
}

fn bench_drain(
    runtime: &tokio::runtime::Runtime,
    ctx: &Ctx,
    pg: &Postgres,
    backlog: u64,
    push_rows: usize,
    batch_rows: usize,
) -> anyhow::Result<Vec<Figure>> {
    let n = backlog as usize;
    let start_ms = (autocore_agent::shared::now_ms() - 86_400_000) / 1000 * 1000;
    let reset = |what: &str| -> anyhow::Result<()> {
        pg.psql(
            DATABASE,
            &["-c", "truncate public.telemetry_data", "-c", "checkpoint"],
        )
        .with_context(|| format!("emptying telemetry_data {what}"))?;
        Ok(())
    };
    let count = || -> anyhow::Result<usize> {
        let out = pg
            .psql(
                DATABASE,
                &[
                    "-t",
                    "-A",
                    "-c",
                    "select count(*) from public.telemetry_data",
                ],
            )
            .context("counting telemetry_data")?;
        out.trim()
            .parse()
            .with_context(|| format!("count output {out:?}"))
    };

    // Baseline: the same rows, the same batch size, the same JWT and Prefer, one request at a time.
    reset("before the bare push")?;
    let url = format!(
        "{}/telemetry_data?on_conflict=device_id,sensor_key,recorded_at",
        ctx.rest
    );
    let bare_wall = runtime.block_on(async {
        let started = Instant::now();
        let mut k = 0;
        while k < n {
            let end = (k + push_rows).min(n);
            let rows: Vec<Value> = (k..end)
                .map(|k| {
                    let r = backlog_reading(k, start_ms);
                    json!({
                        "device_id": r.device_id, "sensor_key": r.sensor_key, "value": r.value,
                        "unit": r.unit,
                        "recorded_at": autocore_agent::cloud::format_timestamp_ms(r.recorded_at_ms),
                    })
                })
                .collect();
            let response = ctx
                .http
                .post(&url)
                .bearer_auth(&ctx.agent_jwt)
                .header("Prefer", "return=minimal,resolution=ignore-duplicates")
                .header("Content-Type", "application/json")
                .body(Value::Array(rows).to_string())
                .send()
                .await
                .context("POST /telemetry_data")?;
            let status = response.status();
            if !status.is_success() {
                bail!(
                    "POST /telemetry_data answered {status}: {}",
                    response.text().await.unwrap_or_default()
                );
            }
            k = end;
        }
        anyhow::Ok(started.elapsed())
    })?;
    let bare_count = count()?;
    ensure!(
        bare_count == n,
        "the bare push left {bare_count} of {n} rows"
    );
    eprintln!(
        "bench-agent:   bare push: {n} readings in {:.2} s",
        bare_wall.as_secs_f64()
    );

    // The agent: fill its outbox while it is not running, then start it and time the drain.
    reset("before the agent's drain")?;
    let dir = tempfile::Builder::new()
        .prefix("autocore-bench-drain-")
        .tempdir()
        .context("a folder for the agent's database")?;
    let db = dir.path().join("agent.db");
    let fill_started = Instant::now();
    {
        let mut store = Store::open(&db).context("opening the agent's store")?;
        let mut k = 0;
        while k < n {
            let end = (k + batch_rows).min(n);
            let chunk: Vec<Reading> = (k..end).map(|k| backlog_reading(k, start_ms)).collect();
            store
                .enqueue_readings(&chunk, autocore_agent::shared::now_ms())
                .context("filling the outbox")?;
            k = end;
        }
        let depth = store
            .outbox_stats(autocore_agent::shared::now_ms())
            .context("outbox stats")?
            .depth;
        ensure!(depth as usize == n, "the outbox holds {depth}, not {n}");
    }
    let fill_wall = fill_started.elapsed();
    eprintln!(
        "bench-agent:   outbox filled with {n} readings in {:.2} s",
        fill_wall.as_secs_f64()
    );
    let (agent_wall, samples) = runtime.block_on(async {
        let masters: Vec<String> = (1..=DATA_MASTERS).map(master).collect();
        let started = Instant::now();
        let agent = start_agent(ctx, &db, &masters).await?;
        let mut samples = Vec::new();
        let deadline = started + Duration::from_secs(1800);
        let wall = loop {
            let h = health(&ctx.http, &agent.api).await?;
            let depth = h["outbox"]["depth"]
                .as_u64()
                .with_context(|| format!("no outbox.depth in {h}"))?;
            if depth == 0 {
                break started.elapsed();
            }
            samples.push((started.elapsed(), depth));
            ensure!(
                Instant::now() < deadline,
                "the outbox still held {depth} after 30 minutes"
            );
            // Not faster: every GET /health counts the whole outbox in SQLite, on the store's
            // one connection, which the push loop also needs.
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        agent.stop().await?;
        anyhow::Ok((wall, samples))
    })?;
    let agent_count = count()?;
    ensure!(
        agent_count == n,
        "after the drain telemetry_data holds {agent_count} of {n}"
    );
    let mid = samples
        .iter()
        .find(|(_, d)| (*d as usize) <= n / 2)
        .map(|(t, _)| format!("{:.1} s", t.as_secs_f64()))
        .unwrap_or_else(|| "-".into());
    eprintln!(
        "bench-agent:   agent drained {n} readings in {:.2} s (half of them by {mid})",
        agent_wall.as_secs_f64()
    );
    let ratio = bare_wall.as_secs_f64() / agent_wall.as_secs_f64();
    Ok(vec![Figure {
        name: format!(
            "backlog drain, outbox → PostgREST ({n} readings, {DATA_MASTERS} masters; batches of {push_rows})"
        ),
        agent: format!(
            "{:.1} s ({:.0} readings/s)",
            agent_wall.as_secs_f64(),
            n as f64 / agent_wall.as_secs_f64()
        ),
        baseline: format!(
            "{:.1} s ({:.0} readings/s; bare POST /telemetry_data, one request at a time)",
            bare_wall.as_secs_f64(),
            n as f64 / bare_wall.as_secs_f64()
        ),
        ratio: format!("{ratio:.2} (speed)"),
        target: "< 60 s and ≥ 0.7".into(),
        met: Some(agent_wall < Duration::from_secs(60) && ratio >= 0.7),
    }])
}

// ------------------------------------------------------------------------------------- commands

async fn post(
    ctx: &Ctx,
    path: &str,
    jwt: &str,
    body: Value,
    prefer: Option<&str>,
) -> anyhow::Result<Value> {
    let mut request = ctx
        .http
        .post(format!("{}{path}", ctx.rest))
        .bearer_auth(jwt)
        .json(&body);
    if let Some(prefer) = prefer {
        request = request.header("Prefer", prefer);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("reading the answer of POST {path}"))?;
    ensure!(status.is_success(), "POST {path} answered {status}: {text}");
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The dashboard's insert of one manual command; returns its id.
async fn insert_command(ctx: &Ctx, master: &str, relay: u32) -> anyhow::Result<i64> {
    let body = post(
        ctx,
        "/relay_commands_slave",
        &ctx.user_jwt,
        json!({
            "master_device_id": master, "slave_mac_address": SLAVE,
            "relay_numbers": [relay], "actions": ["on"], "duration_seconds": [2]
        }),
        Some("return=representation"),
    )
    .await?;
    body[0]["id"]
        .as_i64()
        .with_context(|| format!("no id in the insert's answer {body}"))
}

async fn bench_commands(ctx: &Ctx, commands: u64, poll_ms: u64) -> anyhow::Result<Vec<Figure>> {
    let (db_client, connection) = tokio_postgres::connect(&ctx.pg_url, tokio_postgres::NoTls)
        .await
        .context("connecting to Postgres")?;
    let conn_task = tokio::spawn(connection);

    // Baseline: insert, lock, complete, each one bare request, on a master no agent polls.
    let mut bare_us = Vec::new();
    for i in 0..commands {
        let started = Instant::now();
        let id = insert_command(ctx, BARE_MASTER, (i % 4) as u32).await?;
        let locked = post(
            ctx,
            "/rpc/get_and_lock_slave_commands",
            &ctx.agent_jwt,
            json!({"p_master_device_id": BARE_MASTER, "p_limit": 5, "p_timeout_seconds": 30}),
            None,
        )
        .await?;
        ensure!(
            locked.as_array().is_some_and(|a| a.len() == 1),
            "the bare lock returned {locked}"
        );
        post(
            ctx,
            "/rpc/complete_slave_command",
            &ctx.agent_jwt,
            json!({"p_command_id": id, "p_execution_time_ms": 10}),
            None,
        )
        .await?;
        bare_us.push(started.elapsed().as_micros() as u64);
    }

    // The agent with one simulated master that acks.
    let dir = tempfile::Builder::new()
        .prefix("autocore-bench-commands-")
        .tempdir()
        .context("a folder for the agent's database")?;
    let the_master = master(1);
    let (sim_stop, sim_stopped) = oneshot::channel::<()>();
    let sim_task = tokio::spawn(sim::run(
        sim_config(ctx, std::slice::from_ref(&the_master), 1, 1000)?,
        async move {
            let _ = sim_stopped.await;
        },
    ));
    let agent = start_agent(
        ctx,
        &dir.path().join("agent.db"),
        std::slice::from_ref(&the_master),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = health(&ctx.http, &agent.api).await?;
        if h["masters"]
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["online"] == true))
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the simulated master never showed online: {h}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut agent_us = Vec::new();
    let mut server_ms = Vec::new();
    for i in 0..commands {
        // A random phase against the agent's poll tick.
        let pause = rand::thread_rng().gen_range(0..poll_ms);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let started = Instant::now();
        let id = insert_command(ctx, &the_master, (i % 4) as u32).await?;
        let deadline = started + Duration::from_secs(30);
        loop {
            let row = db_client
                .query_one(
                    "select status, (extract(epoch from (completed_at - created_at)) * 1000)::float8 from public.relay_commands_slave where id = $1",
                    &[&id],
                )
                .await
                .context("reading the command's status")?;
            let status: String = row.get(0);
            match status.as_str() {
                "completed" => {
                    agent_us.push(started.elapsed().as_micros() as u64);
                    server_ms.push(row.get::<_, Option<f64>>(1).unwrap_or(f64::NAN));
                    break;
                }
                "failed" | "expired" | "cancelled" => bail!("command {id} ended {status}"),
                _ => {}
            }
            ensure!(
                Instant::now() < deadline,
                "command {id} not completed after 30 s (status {status})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    agent.stop().await?;
    let _ = sim_stop.send(());
    let _ = sim_task.await;
    conn_task.abort();

    let p = |v: &[u64], q: f64| {
        percentile(v, q)
            .map(|us| us as f64 / 1000.0)
            .unwrap_or(f64::NAN)
    };
    let (a50, a99, amax) = (p(&agent_us, 0.50), p(&agent_us, 0.99), p(&agent_us, 1.0));
    let (b50, b99) = (p(&bare_us, 0.50), p(&bare_us, 0.99));
    let mut server_sorted = server_ms.clone();
    server_sorted.sort_by(f64::total_cmp);
    let s = |q: f64| {
        server_sorted
            .get(((server_sorted.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    eprintln!(
        "bench-agent:   agent p50 {a50:.0} ms p99 {a99:.0} ms max {amax:.0} ms (in the database: p50 {:.0} p99 {:.0}); bare p50 {b50:.1} ms p99 {b99:.1} ms",
        s(0.5),
        s(0.99)
    );
    let target = poll_ms as f64 + 100.0;
    Ok(vec![Figure {
        name: format!(
            "command latency, dashboard insert → `completed` ({commands} commands, one at a time, random phase; poll {poll_ms} ms; `completed_at - created_at` in the database: p50 {:.0} ms, p99 {:.0} ms)",
            s(0.5),
            s(0.99)
        ),
        agent: format!("p50 {a50:.0} ms, p99 {a99:.0} ms (max {amax:.0})"),
        baseline: format!(
            "p50 {b50:.1} ms, p99 {b99:.1} ms (bare insert + lock RPC + complete RPC)"
        ),
        ratio: format!("p99 − bare p99 = {:.0} ms", a99 - b99),
        target: format!("p99 < {target:.0} ms"),
        met: Some(a99 < target),
    }])
}

/// The simulator playing `masters`, one slave each, `sensors` sensors each.
fn sim_config(
    ctx: &Ctx,
    masters: &[String],
    sensors: usize,
    interval_ms: u64,
) -> anyhow::Result<SimConfig> {
    let masters = masters
        .iter()
        .map(|m| {
            Ok(MasterSpec {
                id: DeviceId::new(m).with_context(|| format!("device id {m}"))?,
                key: MasterKey::from_hex(KEY_HEX).context("the master key")?,
                slaves: vec![SlaveSpec {
                    mac: SLAVE.parse().context("the slave's MAC")?,
                    relays: vec![
                        RelayLimits {
                            max_on_s: 3600,
                            boot_on: false,
                        };
                        4
                    ],
                }],
                sensors: (0..sensors)
                    .map(|s| SensorSpec {
                        name: format!("s{s}"),
                        unit: Some("C".into()),
                        source: SensorSource::Ramp {
                            from: 18.0,
                            to: 26.0,
                            steps: 600,
                        },
                    })
                    .collect(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(SimConfig {
        mqtt_url: Some(ctx.mqtt.clone()),
        masters,
        timing: MasterTiming {
            telemetry_interval_ms: interval_ms,
            ..MasterTiming::default()
        },
        radio: RadioSpec {
            loss_percent: 0,
            delay_ms: 1,
        },
        state_dir: None,
        actuation_log_dir: None,
        radio_control: None,
        poll: None,
    })
}

// ------------------------------------------------------------------------------------- memory

fn bench_memory(
    runtime: &tokio::runtime::Runtime,
    ctx: &Ctx,
    agent_exe: &Path,
    load_seconds: u64,
    idle_seconds: u64,
) -> anyhow::Result<Vec<Figure>> {
    let dir = tempfile::Builder::new()
        .prefix("autocore-bench-memory-")
        .tempdir()
        .context("a folder for the agent's files")?;
    let masters: Vec<String> = (1..=MEMORY_MASTERS).map(master).collect();
    let listen = format!("127.0.0.1:{}", free_port()?);
    let config_path = dir.path().join("agent.toml");
    std::fs::write(
        &config_path,
        agent_toml(ctx, &dir.path().join("agent.db"), &listen, &masters),
    )
    .context("writing the agent's configuration")?;
    // Spawned from the main thread: the child dies with it (PR_SET_PDEATHSIG).
    let mut child = ManagedProcess::spawn(ProcessSpec {
        name: "autocore-agent-under-test",
        program: agent_exe.to_path_buf(),
        args: vec!["run".into(), "-c".into(), config_path.display().to_string()],
        env: vec![("RUST_LOG".into(), "warn".into())],
        run_as: None,
        log_path: dir.path().join("agent.log"),
        stop_signal: nix::sys::signal::Signal::SIGTERM,
    })
    .context("starting the agent process")?;
    let pid = child.pid().context("the agent process has no pid")?;
    let api = format!("http://{listen}");
    let hz = clock_ticks_per_second();

    let result = runtime.block_on(async {
        wait_for_health(&ctx.http, &api).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rss_start, _) = memory_kb(pid)?;

        let (sim_stop, sim_stopped) = oneshot::channel::<()>();
        let sim_task = tokio::spawn(sim::run(
            sim_config(ctx, &masters, SENSORS_PER_PAYLOAD, 1000)?,
            async move {
                let _ = sim_stopped.await;
            },
        ));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let h = health(&ctx.http, &api).await?;
            let online = h["masters"]
                .as_array()
                .map(|a| a.iter().filter(|m| m["online"] == true).count())
                .unwrap_or(0);
            if online == MEMORY_MASTERS {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "only {online} of {MEMORY_MASTERS} masters online after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let stored_before = metric(&ctx.http, &api, "autocore_agent_readings_stored_total").await?;
        let ticks_before = cpu_ticks(pid)?;
        let started = Instant::now();
        let mut rss_max = 0;
        while started.elapsed() < Duration::from_secs(load_seconds) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rss_max = rss_max.max(memory_kb(pid)?.0);
        }
        let load_wall = started.elapsed();
        let load_cpu = (cpu_ticks(pid)? - ticks_before) as f64 / hz / load_wall.as_secs_f64();
        let stored =
            metric(&ctx.http, &api, "autocore_agent_readings_stored_total").await? - stored_before;
        let (rss_load_end, hwm_load) = memory_kb(pid)?;
        let _ = sim_stop.send(());
        let _ = sim_task.await;

        // Idle: no MQTT traffic; the agent keeps polling the backend for its 50 masters.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let ticks_before = cpu_ticks(pid)?;
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(idle_seconds)).await;
        let idle_wall = started.elapsed();
        let idle_ticks = cpu_ticks(pid)? - ticks_before;
        let idle_cpu = idle_ticks as f64 / hz / idle_wall.as_secs_f64();
        let (rss_idle_end, hwm) = memory_kb(pid)?;
        anyhow::Ok((
            rss_start,
            rss_max,
            rss_load_end,
            hwm_load,
            stored / load_wall.as_secs_f64(),
            load_cpu,
            idle_cpu,
            idle_ticks,
            rss_idle_end,
            hwm,
        ))
    });
    child
        .ensure_running()
        .context("the agent process died during the benchmark")?;
    child.stop(Duration::from_secs(10));
    let (
        rss_start,
        rss_max,
        rss_load_end,
        hwm_load,
        stored_rate,
        load_cpu,
        idle_cpu,
        idle_ticks,
        rss_idle_end,
        hwm,
    ) = result?;
    let mb = |kb: u64| kb as f64 / 1024.0;
    eprintln!(
        "bench-agent:   RSS start {:.1} MB, under load max {:.1} MB (end {:.1}, HWM {:.1}), after idle {:.1} MB (HWM {:.1}); {stored_rate:.0} readings/s stored; CPU {:.1}% under load, {:.2}% idle ({idle_ticks} ticks in {idle_seconds} s)",
        mb(rss_start),
        mb(rss_max),
        mb(rss_load_end),
        mb(hwm_load),
        mb(rss_idle_end),
        mb(hwm),
        load_cpu * 100.0,
        idle_cpu * 100.0
    );
    Ok(vec![
        Figure {
            name: format!(
                "resident memory, agent process ({MEMORY_MASTERS} simulated masters × {SENSORS_PER_PAYLOAD} sensors at 1 Hz for {load_seconds} s; {stored_rate:.0} readings/s stored)"
            ),
            agent: format!("VmRSS max {:.1} MB (VmHWM {:.1} MB)", mb(rss_max), mb(hwm)),
            baseline: format!("VmRSS {:.1} MB idle before the load", mb(rss_start)),
            ratio: format!("{:.2}", rss_max as f64 / rss_start.max(1) as f64),
            target: "< 30 MB".into(),
            met: Some(mb(hwm) < 30.0),
        },
        Figure {
            name: format!(
                "CPU of the agent process (utime + stime; idle = {idle_seconds} s without MQTT traffic, still polling the backend for {MEMORY_MASTERS} masters every second)"
            ),
            agent: format!(
                "idle {:.2}% of one core ({idle_ticks} ticks)",
                idle_cpu * 100.0
            ),
            baseline: format!("{:.1}% of one core under the load above", load_cpu * 100.0),
            ratio: format!("{:.2}", idle_cpu / load_cpu.max(f64::MIN_POSITIVE)),
            target: "(reported)".into(),
            met: None,
        },
    ])
}

// ------------------------------------------------------------------------------------- helpers

fn machine_description() -> String {
    format!(
        "{}\n- data folder (SQLite, Postgres): {}",
        autocore_stack::bench::machine_lines(),
        autocore_stack::bench::data_folder()
    )
}
