//! `bench-engine`: the decision engine's benchmarks. Starts Postgres 15 + PostgREST 12 and
//! Mosquitto on loopback, loads sql/bench/setup.sql (one owner, the agent `bench-agent`, masters
//! `bench-master-1..=50`; masters 51..=200 are added here), 4 rules per master, and measures:
//!
//! 1. the sans-I/O `Engine::on_reading` cost per reading with 10, 200 and 2,000 rules, each sensor
//!    read by 2 rules, and with every rule reading the same sensor (in process, before the stack);
//! 2. reading → signed command: from a telemetry reading published to
//!    `autocore/devices/{master}/telemetry` to the signed command on
//!    `autocore/devices/{master}/command`, published by the release `autocore-agent` running as a
//!    process of its own; beside it, in the same run and interleaved, Node-RED (npm `node-red`,
//!    installed on demand into `target/bench-peers/`) running `tests/bench/node-red/flow.json`,
//!    the same rules as a flow, and a bare MQTT echo (the floor: the same two broker hops with
//!    nothing in between), and one SQLite commit beside the agent's database (the fsync the
//!    agent's firing waits for before it publishes). Three loads: sparse (50 masters, no background telemetry), 50 and 200
//!    simulated masters × 10 sensors at 1 Hz; CPU (from /proc/<pid>/stat) and resident memory of
//!    the agent and of Node-RED under each;
//! 3. emergency stop: POST /emergency/stop on the agent's local API until the simulator's relay
//!    state reports show every relay off, 10 masters × 2 slaves.
//!
//! `--quick` (or `AUTOCORE_BENCH_QUICK=1`) runs a short version. Optional environment:
//! `AUTOCORE_BENCH_PROBES` (latency probes per load, default 600, quick 100),
//! `AUTOCORE_BENCH_STOPS` (emergency stop rounds, default 20, quick 5), `AUTOCORE_BENCH_ROUNDS`
//! (engine rounds, default 9, quick 3), `AUTOCORE_BENCH_PERF` (a file: `perf record` samples the
//! agent process during the 50-master load into it), `AUTOCORE_BENCH_AGENT_BIN` (the agent
//! binary to measure; default: `autocore-agent` beside this binary).

use autocore_stack::bench::{
    clock_ticks_per_second, cpu_ticks, env_number, free_port, health, memory_kb, percentile,
    wait_for_health,
};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use autocore_agent::config::AgentConfig;
use autocore_agent::rules::{Catalog, Engine, EngineSettings};
use autocore_agent::store::{Reading, RuleRecord};
use autocore_stack::postgres::DATABASE;
use autocore_stack::process::{ManagedProcess, ProcessSpec};
use autocore_stack::{Claims, PostgresOptions, Stack, StackOptions, repo_root};
use firmware_protocol::message::RelayLimits;
use firmware_protocol::sim::{
    self, MasterSpec, MasterTiming, RadioSpec, SensorSource, SensorSpec, SimConfig, SlaveSpec,
    rumqttc,
};
use firmware_protocol::{DeviceId, MasterKey};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// The bench owner and agent of sql/bench/setup.sql.
const BENCH_OWNER: Uuid = Uuid::from_u128(0xbe000000_0000_0000_0000_00000000be01);
const BENCH_AGENT: &str = "bench-agent";
/// The signing key every simulated master shares with the agent.
const KEY_HEX: &str = "9a1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
const SLAVES: [&str; 2] = ["14:33:5C:38:BF:60", "14:33:5C:38:BF:61"];
const OPERATOR: &str = "bench-operator-token";
/// Masters of the largest load; setup.sql has the first 50.
const MASTERS_MAX: usize = 200;
const SETUP_MASTERS: usize = 50;
/// Sensors per master in the background telemetry.
const SENSORS: usize = 10;
/// Rules per master: one on the trigger, the others on background sensors (never true).
const RULES_PER_MASTER: usize = 4;
/// Masters and slaves of the emergency stop benchmark.
const STOP_MASTERS: usize = 10;
/// The Node-RED release the peer runs (the last line that runs on Debian 12's Node 20 too).
const NODE_RED_VERSION: &str = "4.1.15";
/// The sensor Node-RED's rule R0 reads: its probes never fire the agent's rules, nor the reverse.
const NODE_RED_TRIGGER: &str = "nr_trigger";

fn master(n: usize) -> String {
    format!("bench-master-{n}")
}

struct Ctx {
    mqtt: String,
    http: reqwest::Client,
    logins: autocore_stack::bench::BenchLogins,
    /// The agent's configuration but its masters and API address.
    agent_base_toml: String,
}

struct Figure {
    name: String,
    value: String,
    baseline: String,
    target: String,
    met: Option<bool>,
}

/// One load of the latency benchmark.
#[derive(Debug, Clone, Copy)]
struct Load {
    label: &'static str,
    masters: usize,
    sensors: usize,
}

/// What one load measured, for the table and the targets.
#[derive(Debug, Clone)]
struct LoadResult {
    load: Load,
    agent: Quantiles,
    node_red: Quantiles,
    bare: Quantiles,
    /// One SQLite commit (WAL, `synchronous = FULL`) of one outbox row beside the agent's
    /// database: the fsync the agent's firing must wait for.
    commit: Quantiles,
    missed: (usize, usize),
    agent_cpu: f64,
    node_red_cpu: f64,
    agent_rss_kb: u64,
    node_red_rss_kb: u64,
    load_before: String,
    load_after: String,
    seconds: f64,
}

#[derive(Debug, Clone, Copy)]
struct Quantiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Quantiles {
    fn of(us: &[u64]) -> Quantiles {
        let ms = |q: f64| percentile(us, q).unwrap_or(0) as f64 / 1000.0;
        Quantiles {
            p50: ms(0.5),
            p99: ms(0.99),
            max: ms(1.0),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var("AUTOCORE_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let probes = env_number(
        "AUTOCORE_BENCH_PROBES",
        if quick { 100 } else { 600 },
        "a whole number",
    )? as usize;
    let stops = env_number(
        "AUTOCORE_BENCH_STOPS",
        if quick { 5 } else { 20 },
        "a whole number",
    )? as usize;
    let rounds = env_number(
        "AUTOCORE_BENCH_ROUNDS",
        if quick { 3 } else { 9 },
        "a whole number",
    )? as usize;
    let perf_file = std::env::var_os("AUTOCORE_BENCH_PERF").map(PathBuf::from);
    let agent_exe = agent_binary()?;
    let node_red_js = node_red_installed().context("installing Node-RED for the comparison")?;

    println!("## Machine\n\n{}", autocore_stack::bench::machine_lines());
    println!(
        "- load average before: {}\n- mode: {}\n- agent: {}\n- Node-RED {NODE_RED_VERSION} on {}\n",
        autocore_stack::bench::load_average(),
        if quick { "quick" } else { "full" },
        agent_exe.display(),
        node_version(),
    );
    let mut figures = Vec::new();

    // 1 first: in process, no services, so nothing else runs on the machine's cores meanwhile.
    eprintln!("bench-engine: 1/3 Engine::on_reading cost ({rounds} rounds)");
    figures.extend(bench_evaluation(rounds, quick).context("the evaluation benchmark")?);

    eprintln!("bench-engine: starting Postgres 15 + PostgREST 12 and Mosquitto");
    let stack = Stack::start(StackOptions {
        backend: true,
        mqtt: true,
        broker: autocore_stack::Security::Secured,
        postgres: PostgresOptions {
            durable: false,
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
    pg.psql(DATABASE, &["-c", &more_masters_sql()])
        .context("adding masters 51..=200")?;
    // 800 rows are more than one argument may hold: through a file.
    let rules_file = tempfile::NamedTempFile::new().context("a file for the rules' SQL")?;
    std::fs::write(rules_file.path(), rules_sql()).context("writing the rules' SQL")?;
    pg.psql(DATABASE, &["-f", &rules_file.path().display().to_string()])
        .context("inserting the rules")?;
    let masters: Vec<String> = (1..=MASTERS_MAX).map(master).collect();
    let logins = autocore_stack::bench::bench_logins(
        &stack,
        BENCH_AGENT,
        &masters,
        KEY_HEX,
        &[
            "bench-prober",
            "bench-stop-watch",
            "bench-echo",
            "bench-node-red",
        ],
    )?;
    let mqtt = stack.mqtt_url().context("the stack has no Mosquitto")?;
    let agent_base_toml = format!(
        "[agent]\nid = \"{BENCH_AGENT}\"\n[cloud]\nrest_url = \"{rest}\"\njwt = \"{jwt}\"\n[mqtt]\nurl = \"{mqtt}\"\n{login}[safety]\noperator_token = \"{OPERATOR}\"\n",
        rest = stack.rest_url().context("the stack has no PostgREST")?,
        jwt = stack.token(&Claims::agent(BENCH_OWNER, BENCH_AGENT)),
        login = logins.agent_toml(),
    );
    let ctx = Ctx {
        mqtt,
        http: reqwest::Client::new(),
        logins,
        agent_base_toml,
    };
    let dir = tempfile::Builder::new()
        .prefix("autocore-bench-engine-")
        .tempdir()
        .context("a folder for the agent's and Node-RED's files")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;

    // Processes are spawned from this (the main) thread: they die with it (PR_SET_PDEATHSIG).
    let node_red = start_node_red(&ctx, &node_red_js, dir.path())?;
    let floor: CommitFloor = std::sync::Arc::new(std::sync::Mutex::new(
        autocore_agent::store::Store::open(&dir.path().join("commit-floor.db"))
            .context("the commit floor's database")?,
    ));
    let mut results = Vec::new();
    let loads = [
        Load {
            label: "sparse",
            masters: SETUP_MASTERS,
            sensors: 0,
        },
        Load {
            label: "50 masters",
            masters: SETUP_MASTERS,
            sensors: SENSORS,
        },
        Load {
            label: "200 masters",
            masters: MASTERS_MAX,
            sensors: SENSORS,
        },
    ];
    let mut agent = AgentProcess::start(&ctx, &agent_exe, dir.path(), SETUP_MASTERS)?;
    for load in loads {
        if agent.masters != load.masters {
            agent.process.stop(Duration::from_secs(15));
            agent = AgentProcess::start(&ctx, &agent_exe, dir.path(), load.masters)?;
        }
        runtime.block_on(wait_for_health(&ctx.http, &agent.api))?;
        eprintln!(
            "bench-engine: 2/3 reading → signed command, {} ({probes} probes)",
            load.label
        );
        let perf = match (&perf_file, load.label) {
            (Some(file), "50 masters") => Some(file.clone()),
            _ => None,
        };
        let result = runtime
            .block_on(bench_latency(
                &ctx, &floor, &agent, &node_red, load, probes, perf,
            ))
            .with_context(|| format!("the latency benchmark, {}", load.label))?;
        results.push(result);
        // The agent's own view of the firing path, to tell the store from the hops.
        let metrics = runtime.block_on(async {
            ctx.http
                .get(format!("{}/metrics", agent.api))
                .send()
                .await?
                .text()
                .await
        })?;
        for line in metrics.lines().filter(|l| {
            (l.starts_with("autocore_agent_automation_write_seconds")
                || l.starts_with("autocore_agent_rule_firing_seconds"))
                && !l.contains("bucket")
        }) {
            eprintln!("bench-engine:   agent metric {line}");
        }
        if load.label == "50 masters" {
            eprintln!("bench-engine: 3/3 emergency stop ({stops} rounds)");
            figures.extend(
                runtime
                    .block_on(bench_stop(&ctx, &agent.api, stops))
                    .context("the emergency stop benchmark")?,
            );
        }
    }
    agent.process.stop(Duration::from_secs(15));
    drop(node_red);
    figures.extend(latency_figures(&results));

    println!(
        "- load average after: {}\n",
        autocore_stack::bench::load_average()
    );
    println!("## Reading → signed command, CPU and memory\n");
    println!(
        "| load | agent p50 / p99 (max) ms | Node-RED p50 / p99 (max) ms | bare echo p50 / p99 (max) ms | one commit p50 / p99 (max) ms | agent CPU | Node-RED CPU | agent RSS | Node-RED RSS | load average before → after |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for r in &results {
        let q = |q: &Quantiles| format!("{:.2} / {:.2} ({:.2})", q.p50, q.p99, q.max);
        println!(
            "| {} ({:.0} s) | {} | {} | {} | {} | {:.1} % | {:.1} % | {:.1} MB | {:.1} MB | {} → {} |",
            r.load.label,
            r.seconds,
            q(&r.agent),
            q(&r.node_red),
            q(&r.bare),
            q(&r.commit),
            r.agent_cpu * 100.0,
            r.node_red_cpu * 100.0,
            r.agent_rss_kb as f64 / 1024.0,
            r.node_red_rss_kb as f64 / 1024.0,
            r.load_before,
            r.load_after,
        );
    }
    println!();
    println!("## Figures\n");
    println!("| figure | measured | baseline (same run) | target | met |");
    println!("| --- | ---: | ---: | --- | --- |");
    for f in &figures {
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "| {} | {} | {} | {} | {met} |",
            f.name, f.value, f.baseline, f.target
        );
    }
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(stack);
    Ok(())
}

/// The targets of issue 15, each against its peer measured in the same run.
fn latency_figures(results: &[LoadResult]) -> Vec<Figure> {
    let mut figures = Vec::new();
    let at = |label: &str| results.iter().find(|r| r.load.label == label);
    for r in results {
        figures.push(Figure {
            name: format!(
                "reading → signed command, {} ({} × {} sensors at 1 Hz; {} of the agent's and {} of Node-RED's probes got nothing in 2 s)",
                r.load.label, r.load.masters, r.load.sensors, r.missed.0, r.missed.1
            ),
            value: format!("agent p50 {:.2} ms, p99 {:.2} ms", r.agent.p50, r.agent.p99),
            baseline: format!(
                "Node-RED p50 {:.2} ms, p99 {:.2} ms; bare echo p50 {:.2} ms, p99 {:.2} ms",
                r.node_red.p50, r.node_red.p99, r.bare.p50, r.bare.p99
            ),
            target: "p50 ≤ Node-RED's".into(),
            met: Some(r.agent.p50 <= r.node_red.p50),
        });
        figures.push(Figure {
            name: format!(
                "the agent's own share, {}: agent − (bare echo + one commit)",
                r.load.label
            ),
            value: format!("p50 {:.2} ms", r.agent.p50 - r.bare.p50 - r.commit.p50),
            baseline: format!(
                "one commit p50 {:.2} ms, p99 {:.2} ms",
                r.commit.p50, r.commit.p99
            ),
            target: "(reported)".into(),
            met: None,
        });
        figures.push(Figure {
            name: format!("CPU under load, {}", r.load.label),
            value: format!("agent {:.1} % of a core", r.agent_cpu * 100.0),
            baseline: format!("Node-RED {:.1} % of a core", r.node_red_cpu * 100.0),
            target: "≤ Node-RED's".into(),
            met: Some(r.agent_cpu <= r.node_red_cpu),
        });
    }
    if let Some(r) = at("50 masters") {
        figures.push(Figure {
            name: "reading → signed command p99, 50 masters".into(),
            value: format!("{:.2} ms", r.agent.p99),
            baseline: format!("bare echo {:.2} ms", r.bare.p99),
            target: "≤ 5 ms".into(),
            met: Some(r.agent.p99 <= 5.0),
        });
    }
    if let (Some(a), Some(b)) = (at("50 masters"), at("200 masters")) {
        figures.push(Figure {
            name: "200 masters against 50 (agent)".into(),
            value: format!(
                "p50 ×{:.2}, p99 ×{:.2}",
                b.agent.p50 / a.agent.p50.max(1e-9),
                b.agent.p99 / a.agent.p99.max(1e-9)
            ),
            baseline: format!(
                "Node-RED p50 ×{:.2}, p99 ×{:.2}",
                b.node_red.p50 / a.node_red.p50.max(1e-9),
                b.node_red.p99 / a.node_red.p99.max(1e-9)
            ),
            target: "≤ ×1.5".into(),
            met: Some(b.agent.p50 <= 1.5 * a.agent.p50 && b.agent.p99 <= 1.5 * a.agent.p99),
        });
        figures.push(Figure {
            name: "resident memory at 200 masters (max of 2 samples a second)".into(),
            value: format!("agent {:.1} MB", b.agent_rss_kb as f64 / 1024.0),
            baseline: format!("Node-RED {:.1} MB", b.node_red_rss_kb as f64 / 1024.0),
            target: "< 30 MB".into(),
            met: Some((b.agent_rss_kb as f64 / 1024.0) < 30.0),
        });
    }
    figures
}

// ------------------------------------------------------------------------------------- engine

fn rule_json(sensor: &str, threshold: f64, relay: usize, slave: &str) -> Value {
    json!({
        "conditions": {"type": "sensor_compare", "sensor": sensor, "operator": ">", "value": threshold},
        "actions": [{"type": "relay_on", "slave_mac_address": slave, "relay_number": relay,
                     "duration_seconds": 1}]
    })
}

fn record(device: &str, n: usize, sensor: &str) -> RuleRecord {
    RuleRecord {
        id: Uuid::new_v4().to_string(),
        device_id: device.into(),
        rule_id: format!("R{n}"),
        rule_name: None,
        rule_description: None,
        rule_json: Some(rule_json(sensor, 1e9, n % 4, SLAVES[0])),
        enabled: true,
        priority: 50,
        cooldown_seconds: 0,
        max_executions_per_hour: 3600,
        revision: 1,
        deleted: false,
        changed_at: "2026-01-01T00:00:00Z".into(),
    }
}

/// `rules` rules, 2 per (device, sensor), 10 sensors per device; or all on dev-0/s0.
fn engine_rules(rules: usize, same_sensor: bool) -> (Vec<RuleRecord>, Vec<(String, String)>) {
    let mut records = Vec::new();
    let mut keys = Vec::new();
    for n in 0..rules {
        let (device, sensor) = if same_sensor {
            ("dev-0".to_string(), "s0".to_string())
        } else {
            let pair = n / 2;
            (
                format!("dev-{}", pair / SENSORS),
                format!("s{}", pair % SENSORS),
            )
        };
        if !keys.contains(&(device.clone(), sensor.clone())) {
            keys.push((device.clone(), sensor.clone()));
        }
        records.push(record(&device, n, &sensor));
    }
    (records, keys)
}

fn bench_evaluation(rounds: usize, quick: bool) -> anyhow::Result<Vec<Figure>> {
    let toml = "[agent]\nid = \"x\"\n[store]\npath = \"/nonexistent.db\"\n[cloud]\nrest_url = \"http://127.0.0.1:1\"\njwt = \"x\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n[engine]\ntime_zone = \"UTC\"\n";
    let config = AgentConfig::from_toml(toml, Path::new("bench.toml"), std::iter::empty())
        .context("a configuration for the engine's settings")?;
    let mut figures = Vec::new();
    let mut rows = Vec::new();
    for (rules, same) in [
        (10, false),
        (200, false),
        (2000, false),
        (10, true),
        (200, true),
        (2000, true),
    ] {
        let (records, keys) = engine_rules(rules, same);
        let mut engine = Engine::new(EngineSettings {
            stale_after_ms: config.engine.stale_after_ms as i64,
            time_zone: config.engine_time_zone().context("the time zone")?,
        });
        let problems = engine.load(&records, &Catalog::default(), &HashMap::new());
        ensure!(problems.is_empty(), "rules did not load: {problems:?}");
        ensure!(engine.rules().count() == rules, "not all rules loaded");
        // Readings cycle over the (device, sensor) pairs the rules read.
        let readings: Vec<Reading> = (0..4096)
            .map(|i| {
                let (device, sensor) = &keys[i % keys.len()];
                Reading {
                    device_id: device.clone(),
                    sensor_key: sensor.clone(),
                    value: 20.0 + (i % 100) as f64 / 10.0,
                    unit: Some("C".into()),
                    recorded_at_ms: 0,
                    received_at_ms: None,
                }
            })
            .collect();
        // Iterations per round: about 20 ms (quick) or 100 ms of work per round.
        let per_eval_guess = if same { rules } else { 2 };
        let iterations = ((if quick { 400_000 } else { 2_000_000 }) / per_eval_guess).max(2_000);
        let mut now = 1_800_000_000_000i64;
        let mut per_round = Vec::new();
        let mut evals_per_reading = 0.0;
        let mut fired = 0usize;
        for round in 0..=rounds {
            let evals_before = engine.evaluations();
            let started = Instant::now();
            for k in 0..iterations {
                let mut r = readings[k % readings.len()].clone();
                now += 1;
                r.recorded_at_ms = now;
                fired += std::hint::black_box(engine.on_reading(&r, now)).len();
            }
            let elapsed = started.elapsed();
            let _ = engine.take_dirty();
            // Round 0 warms up.
            if round > 0 {
                per_round.push(elapsed.as_nanos() as f64 / iterations as f64);
                evals_per_reading =
                    (engine.evaluations() - evals_before) as f64 / iterations as f64;
            }
        }
        ensure!(fired == 0, "a benchmark rule fired");
        // The clone of the reading is part of the loop: measure it alone.
        let started = Instant::now();
        for k in 0..iterations {
            std::hint::black_box(readings[k % readings.len()].clone());
        }
        let clone_ns = started.elapsed().as_nanos() as f64 / iterations as f64;
        per_round.sort_by(f64::total_cmp);
        let median = per_round[per_round.len() / 2];
        let (min, max) = (per_round[0], per_round[per_round.len() - 1]);
        let label = if same {
            format!("{rules} rules, all on one sensor")
        } else {
            format!("{rules} rules, 2 per sensor ({} sensors)", keys.len())
        };
        eprintln!(
            "bench-engine:   {label}: median {median:.0} ns/reading (min {min:.0}, max {max:.0}), {evals_per_reading:.1} evaluations/reading, reading clone {clone_ns:.0} ns"
        );
        rows.push((label.clone(), median, min, max, evals_per_reading, clone_ns));
        figures.push(Figure {
            name: format!(
                "`Engine::on_reading`, {label} ({iterations} readings per round, median of {rounds} rounds)"
            ),
            value: format!(
                "{median:.0} ns/reading ({min:.0}..{max:.0}); {evals_per_reading:.0} evaluations/reading"
            ),
            baseline: format!("{clone_ns:.0} ns (cloning the reading, inside the loop)"),
            target: "grows with the rules reading the sensor, not all rules".into(),
            met: None,
        });
    }
    println!("### Engine::on_reading (sans-I/O)\n");
    println!("| rules | median ns/reading | min..max | evaluations/reading | ns per evaluation |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (label, median, min, max, evals, clone_ns) in &rows {
        println!(
            "| {label} | {median:.0} | {min:.0}..{max:.0} | {evals:.1} | {:.0} |",
            (median - clone_ns) / evals.max(1.0)
        );
    }
    println!();
    Ok(figures)
}

// ------------------------------------------------------------------------------------- agent

/// Masters 51..=200, assigned to the bench agent as setup.sql assigns the first 50.
fn more_masters_sql() -> String {
    format!(
        "insert into public.device_status (device_id, owner_id, agent_id, device_type, mac_address, is_online)
         select 'bench-master-' || m, '{BENCH_OWNER}', '{BENCH_AGENT}', 'master',
                '24:6F:28:BE:00:' || upper(lpad(to_hex(m), 2, '0')), true
           from generate_series({}, {MASTERS_MAX}) m
         on conflict (device_id) do nothing",
        SETUP_MASTERS + 1
    )
}

/// 4 rules per master: R0 `trigger > 0.5` switches relay 0 on; R1..R3 read background sensors
/// s1..s3 and are never true.
fn rules_sql() -> String {
    let mut values = Vec::new();
    for m in 1..=MASTERS_MAX {
        for r in 0..RULES_PER_MASTER {
            let (sensor, threshold) = if r == 0 {
                ("trigger".to_string(), 0.5)
            } else {
                (format!("s{r}"), 1000.0)
            };
            let json = rule_json(&sensor, threshold, r, SLAVES[0]);
            values.push(format!(
                "('{}', 'R{r}', 'bench rule {r}', '{json}'::jsonb, true, 50, 0, 3600)",
                master(m)
            ));
        }
    }
    format!(
        "insert into public.decision_rules (device_id, rule_id, rule_name, rule_json, enabled, priority, cooldown_seconds, max_executions_per_hour) values {}",
        values.join(",\n")
    )
}

/// The release `autocore-agent` beside this binary (same profile, same target folder), or
/// `AUTOCORE_BENCH_AGENT_BIN` (to measure another build, e.g. the one before a change).
fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("AUTOCORE_BENCH_AGENT_BIN") {
        let path = PathBuf::from(path);
        ensure!(
            path.exists(),
            "AUTOCORE_BENCH_AGENT_BIN: {} does not exist",
            path.display()
        );
        return Ok(path);
    }
    autocore_stack::bench::binary_beside_this_one(
        "autocore-agent",
        "build it first with `cargo build --release -p autocore-agent --bin autocore-agent`",
    )
}

/// Node-RED's `red.js`, installed with npm into `target/bench-peers/node-red` on first use (a
/// benchmark peer, not something CI or the product needs).
fn node_red_installed() -> anyhow::Result<PathBuf> {
    let prefix = repo_root().join("target/bench-peers/node-red");
    let red = prefix.join("node_modules/node-red/red.js");
    let installed = std::fs::read_to_string(prefix.join("node_modules/node-red/package.json"))
        .ok()
        .and_then(|p| serde_json::from_str::<Value>(&p).ok())
        .is_some_and(|p| p["version"] == NODE_RED_VERSION);
    if !installed {
        eprintln!(
            "bench-engine: installing node-red@{NODE_RED_VERSION} into {}",
            prefix.display()
        );
        std::fs::create_dir_all(&prefix).context("creating target/bench-peers/node-red")?;
        let status = std::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--omit=optional"])
            .arg("--prefix")
            .arg(&prefix)
            .arg(format!("node-red@{NODE_RED_VERSION}"))
            .status()
            .context("running npm (Node.js and npm are needed for the Node-RED comparison)")?;
        ensure!(status.success(), "npm install node-red failed: {status}");
    }
    ensure!(
        red.exists(),
        "{} is missing after npm install",
        red.display()
    );
    Ok(red)
}

fn node_version() -> String {
    std::process::Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|v| format!("Node.js {}", v.trim()))
        .unwrap_or_else(|| "Node.js (unknown version)".into())
}

/// Node-RED with `tests/bench/node-red/{settings.js,flow.json}` and a broker login of its own.
fn start_node_red(ctx: &Ctx, red: &Path, dir: &Path) -> anyhow::Result<ManagedProcess> {
    let user_dir = dir.join("node-red");
    std::fs::create_dir_all(&user_dir).context("Node-RED's user folder")?;
    let source = repo_root().join("tests/bench/node-red");
    std::fs::copy(source.join("flow.json"), user_dir.join("flow.json"))
        .context("copying the flow")?;
    let login = ctx
        .logins
        .tool_login("bench-node-red")
        .context("Node-RED's broker login")?;
    // `credentialSecret: false`: the credentials file is plain JSON, keyed by the broker node.
    std::fs::write(
        user_dir.join("flow_cred.json"),
        json!({"a7c0b0e0f0000002": {"user": login.username, "password": login.password}})
            .to_string(),
    )
    .context("writing Node-RED's broker login")?;
    let (host, broker_port) = ctx
        .mqtt
        .split_once("://")
        .map_or(ctx.mqtt.as_str(), |(_, rest)| rest)
        .rsplit_once(':')
        .context("the broker's URL has no port")?;
    let mut process = ManagedProcess::spawn(ProcessSpec {
        name: "node-red",
        program: "node".into(),
        args: vec![
            red.display().to_string(),
            "--settings".into(),
            source.join("settings.js").display().to_string(),
            "--userDir".into(),
            user_dir.display().to_string(),
        ],
        env: vec![
            ("AUTOCORE_MQTT_HOST".into(), host.into()),
            (
                "AUTOCORE_MQTT_PORT".into(),
                broker_port.trim_end_matches('/').into(),
            ),
            ("AUTOCORE_BENCH_KEY_HEX".into(), KEY_HEX.into()),
        ],
        run_as: None,
        log_path: dir.join("node-red.log"),
        stop_signal: nix::sys::signal::Signal::SIGTERM,
    })
    .context("starting Node-RED")?;
    // No editor and no HTTP nodes: Node-RED listens on nothing. It is ready when its rule
    // answers the warm-up probes of the latency benchmark.
    std::thread::sleep(Duration::from_secs(1));
    process
        .ensure_running()
        .context("Node-RED stopped at start")?;
    Ok(process)
}

/// The release agent as a process of its own, so that its CPU and memory are its own.
struct AgentProcess {
    process: ManagedProcess,
    pid: u32,
    api: String,
    masters: usize,
}

impl AgentProcess {
    /// Starts the agent with masters 1..=`masters` and a new database.
    fn start(ctx: &Ctx, exe: &Path, dir: &Path, masters: usize) -> anyhow::Result<AgentProcess> {
        let folder = dir.join(format!("agent-{masters}"));
        std::fs::create_dir_all(&folder).context("the agent's folder")?;
        let listen = format!("127.0.0.1:{}", free_port()?);
        let mut toml = format!(
            "{}[store]\npath = \"{}\"\n[api]\nlisten = \"{listen}\"\n",
            ctx.agent_base_toml,
            folder.join("agent.db").display()
        );
        for m in 1..=masters {
            toml.push_str(&format!(
                "[[masters]]\ndevice_id = \"{}\"\nkey = \"{KEY_HEX}\"\n",
                master(m)
            ));
        }
        let config = folder.join("agent.toml");
        std::fs::write(&config, toml).context("writing the agent's configuration")?;
        let process = ManagedProcess::spawn(ProcessSpec {
            name: "autocore-agent",
            program: exe.to_path_buf(),
            args: vec!["run".into(), "-c".into(), config.display().to_string()],
            env: vec![("RUST_LOG".into(), "warn".into())],
            run_as: None,
            log_path: folder.join("agent.log"),
            stop_signal: nix::sys::signal::Signal::SIGTERM,
        })
        .context("starting the agent")?;
        let pid = process.pid().context("the agent has no pid")?;
        Ok(AgentProcess {
            process,
            pid,
            api: format!("http://{listen}"),
            masters,
        })
    }
}

async fn until_online(ctx: &Ctx, api: &str, masters: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = health(&ctx.http, api).await?;
        let online: HashSet<String> = h["masters"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|m| m["online"] == true)
                    .filter_map(|m| {
                        m["device_id"]
                            .as_str()
                            .or(m["id"].as_str())
                            .map(String::from)
                    })
                    .collect()
            })
            .unwrap_or_default();
        if (1..=masters).all(|m| online.contains(&master(m))) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {} masters online after 60 s: {h}",
            online.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The simulator playing masters 1..=n, `slaves` slaves of 4 relays each, `sensors` sensors.
fn sim_config(ctx: &Ctx, n: usize, slaves: usize, sensors: usize) -> anyhow::Result<SimConfig> {
    let masters = (1..=n)
        .map(|m| {
            Ok(MasterSpec {
                id: DeviceId::new(master(m)).context("device id")?,
                key: MasterKey::from_hex(KEY_HEX).context("the master key")?,
                slaves: SLAVES[..slaves]
                    .iter()
                    .map(|mac| {
                        Ok(SlaveSpec {
                            mac: mac.parse().context("a slave's MAC")?,
                            relays: vec![
                                RelayLimits {
                                    max_on_s: 3600,
                                    boot_on: false,
                                };
                                4
                            ],
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?,
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
            telemetry_interval_ms: 1000,
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

struct RunningSim {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), firmware_protocol::sim::SimError>>,
}

fn start_sim(config: SimConfig) -> RunningSim {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(sim::run(config, async move {
        let _ = stopped.await;
    }));
    RunningSim { stop, task }
}

impl RunningSim {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The prober's client, its timestamped publications, and its task (aborted at the end of a
/// load, so that the next load's client of the same id is not kicked off by a reconnect).
type Listener = (
    rumqttc::AsyncClient,
    mpsc::UnboundedReceiver<(Instant, String, Vec<u8>)>,
    tokio::task::JoinHandle<()>,
);

/// An MQTT client whose incoming publications arrive, timestamped, on the returned receiver.
async fn listener(ctx: &Ctx, id: &str, filters: &[&str]) -> anyhow::Result<Listener> {
    let options = ctx.logins.tool_options(&ctx.mqtt, id)?;
    let (client, mut eventloop) = sim::mqtt_client(options);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if tx
                        .send((Instant::now(), p.topic, p.payload.to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    for f in filters {
        client
            .subscribe(*f, rumqttc::QoS::AtLeastOnce)
            .await
            .context("subscribing")?;
    }
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .context("no SUBACK from Mosquitto")?
        .ok();
    Ok((client, rx, task))
}

/// Echo client of the bare round trip: `autocore/bench/echo/in/{m}` (QoS 0) → `autocore/bench/echo/out/{m}`
/// (QoS 1) with a payload of `reply_len` bytes.
async fn start_echo(ctx: &Ctx, reply_len: usize) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let options = ctx.logins.tool_options(&ctx.mqtt, "bench-echo")?;
    let (client, mut eventloop) = sim::mqtt_client(options);
    let (ready_tx, ready) = oneshot::channel();
    let reply = vec![b'x'; reply_len];
    let publisher = client.clone();
    let task = tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let out = p
                        .topic
                        .replace("autocore/bench/echo/in/", "autocore/bench/echo/out/");
                    let _ =
                        publisher.try_publish(out, rumqttc::QoS::AtLeastOnce, false, reply.clone());
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    // The agent subscribes to telemetry with QoS 0: so does the echo.
    client
        .subscribe("autocore/bench/echo/in/+", rumqttc::QoS::AtMostOnce)
        .await
        .context("subscribing the echo")?;
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .context("no SUBACK for the echo")?
        .ok();
    Ok(task)
}

fn probe_payload(sensor: &str, ts_ms: i64, value: f64) -> String {
    json!({"v": 1, "ts_ms": ts_ms, sensor: {"value": value, "unit": "x"}}).to_string()
}

/// Publishes `payload` to `topic` and waits for the first publication on `want` after it.
async fn round_trip(
    client: &rumqttc::AsyncClient,
    rx: &mut mpsc::UnboundedReceiver<(Instant, String, Vec<u8>)>,
    topic: &str,
    payload: String,
    want: &str,
    timeout: Duration,
) -> anyhow::Result<Option<(Duration, usize)>> {
    while rx.try_recv().is_ok() {}
    let started = Instant::now();
    client
        .publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
        .await
        .context("publishing a probe")?;
    let deadline = started + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((at, t, p))) if t == want => return Ok(Some((at - started, p.len()))),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the listener stopped"),
            Err(_) => return Ok(None),
        }
    }
}

/// Telemetry time for a master, strictly increasing per master.
struct Stamps(HashMap<usize, i64>);

impl Stamps {
    fn next(&mut self, m: usize) -> i64 {
        let now = autocore_agent::shared::now_ms();
        let last = self.0.entry(m).or_insert(0);
        *last = (*last + 1).max(now);
        *last
    }
}

/// The highest VmRSS of each pid, sampled twice a second until `stop` is set.
fn sample_memory(
    pids: [u32; 2],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<[u64; 2]> {
    tokio::spawn(async move {
        let mut max = [0u64; 2];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (m, pid) in max.iter_mut().zip(pids) {
                if let Ok((rss, _)) = memory_kb(pid) {
                    *m = (*m).max(rss);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        max
    })
}

/// Publishes `sensor = 1` (the probe, timed until `want`), then `sensor = 0` so that the next
/// probe fires again (a rule fires when its condition becomes true).
async fn probe(
    client: &rumqttc::AsyncClient,
    rx: &mut mpsc::UnboundedReceiver<(Instant, String, Vec<u8>)>,
    stamps: &mut Stamps,
    m: usize,
    sensor: &str,
    want: &str,
    timeout: Duration,
) -> anyhow::Result<Option<(Duration, usize)>> {
    let topic = format!("autocore/devices/{}/telemetry", master(m));
    let got = round_trip(
        client,
        rx,
        &topic,
        probe_payload(sensor, stamps.next(m), 1.0),
        want,
        timeout,
    )
    .await?;
    client
        .publish(
            topic,
            rumqttc::QoS::AtMostOnce,
            false,
            probe_payload(sensor, stamps.next(m), 0.0),
        )
        .await?;
    Ok(got)
}

/// A scratch database with the agent's settings, in the agent's temp folder: the commit floor.
type CommitFloor = std::sync::Arc<std::sync::Mutex<autocore_agent::store::Store>>;

/// Times one commit of one outbox row: what a firing's write costs at least on this disk.
async fn time_commit(floor: &CommitFloor, n: usize) -> anyhow::Result<Duration> {
    let floor = floor.clone();
    tokio::task::spawn_blocking(move || {
        let mut store = floor.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let started = Instant::now();
        store.enqueue(
            autocore_agent::store::OutboxClass::Event,
            &format!("floor:{n}"),
            &json!({"n": n}),
            0,
        )?;
        Ok(started.elapsed())
    })
    .await
    .context("the commit floor's thread")?
}

async fn bench_latency(
    ctx: &Ctx,
    floor: &CommitFloor,
    agent: &AgentProcess,
    node_red: &ManagedProcess,
    load: Load,
    probes: usize,
    perf: Option<PathBuf>,
) -> anyhow::Result<LoadResult> {
    let node_red_pid = node_red.pid().context("Node-RED has no pid")?;
    let sim = start_sim(sim_config(ctx, load.masters, 1, load.sensors)?);
    until_online(ctx, &agent.api, load.masters).await?;
    let (client, mut rx, listening) = listener(
        ctx,
        "bench-prober",
        &[
            "autocore/devices/+/command",
            "autocore/bench/echo/out/+",
            "autocore/bench/node-red/+/command",
        ],
    )
    .await?;
    let mut stamps = Stamps(HashMap::new());
    let cmd = |m: usize| format!("autocore/devices/{}/command", master(m));
    let nr_cmd = |m: usize| format!("autocore/bench/node-red/{}/command", master(m));

    // Warm-up: every master's trigger rule fires once in the agent (the mirror and the engine
    // have the rules) and in Node-RED (connected and subscribed).
    let mut command_len = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    for m in 1..=load.masters {
        for (sensor, want) in [("trigger", cmd(m)), (NODE_RED_TRIGGER, nr_cmd(m))] {
            loop {
                ensure!(
                    Instant::now() < deadline,
                    "master {m}'s {sensor} rule did not fire within 90 s of start"
                );
                let got = probe(
                    &client,
                    &mut rx,
                    &mut stamps,
                    m,
                    sensor,
                    &want,
                    Duration::from_secs(1),
                )
                .await?;
                if let Some((_, len)) = got {
                    if sensor == "trigger" {
                        command_len = len;
                    }
                    break;
                }
            }
        }
    }
    eprintln!(
        "bench-engine:   every trigger rule fired once in both; the agent's command is {command_len} bytes"
    );
    let echo = start_echo(ctx, command_len).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut perf_record = match &perf {
        Some(file) => Some(
            std::process::Command::new("perf")
                .args(["record", "-F", "1999", "-g", "-o"])
                .arg(file)
                .args(["-p", &agent.pid.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting perf record")?,
        ),
        None => None,
    };
    let load_before = autocore_stack::bench::load_average();
    let stop_sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_memory([agent.pid, node_red_pid], stop_sampling.clone());
    let hz = clock_ticks_per_second();
    let ticks_before = (cpu_ticks(agent.pid)?, cpu_ticks(node_red_pid)?);
    let mut agent_us = Vec::new();
    let mut node_red_us = Vec::new();
    let mut bare_us = Vec::new();
    let mut commit_us = Vec::new();
    let mut missed = (0, 0);
    let started = Instant::now();
    let pause = || Duration::from_millis(rand::thread_rng().gen_range(20..40));
    for i in 0..probes {
        let m = i % load.masters + 1;
        tokio::time::sleep(pause()).await;
        let timeout = Duration::from_secs(2);
        match probe(
            &client,
            &mut rx,
            &mut stamps,
            m,
            "trigger",
            &cmd(m),
            timeout,
        )
        .await?
        {
            Some((d, _)) => agent_us.push(d.as_micros() as u64),
            None => missed.0 += 1,
        }
        tokio::time::sleep(pause()).await;
        match probe(
            &client,
            &mut rx,
            &mut stamps,
            m,
            NODE_RED_TRIGGER,
            &nr_cmd(m),
            timeout,
        )
        .await?
        {
            Some((d, _)) => node_red_us.push(d.as_micros() as u64),
            None => missed.1 += 1,
        }
        tokio::time::sleep(pause()).await;
        let bare = round_trip(
            &client,
            &mut rx,
            &format!("autocore/bench/echo/in/{}", master(m)),
            probe_payload("trigger", stamps.next(m), 1.0),
            &format!("autocore/bench/echo/out/{}", master(m)),
            timeout,
        )
        .await?
        .context("the bare echo did not answer in 2 s")?;
        bare_us.push(bare.0.as_micros() as u64);
        tokio::time::sleep(pause()).await;
        let n = commit_us.len() + load.masters * probes;
        commit_us.push(time_commit(floor, n).await?.as_micros() as u64);
    }
    let wall = started.elapsed();
    let ticks_after = (cpu_ticks(agent.pid)?, cpu_ticks(node_red_pid)?);
    stop_sampling.store(true, std::sync::atomic::Ordering::Relaxed);
    let [agent_rss_kb, node_red_rss_kb] = sampler.await.context("the memory sampler")?;
    let load_after = autocore_stack::bench::load_average();
    if let Some(mut perf) = perf_record.take() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(perf.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = perf.wait();
    }
    echo.abort();
    listening.abort();
    sim.stop().await;
    ensure!(
        missed.0 * 100 <= probes && missed.1 * 100 <= probes,
        "probes without a command: agent {}, Node-RED {} of {probes}",
        missed.0,
        missed.1
    );
    let cpu = |before: u64, after: u64| (after - before) as f64 / hz / wall.as_secs_f64();
    let result = LoadResult {
        load,
        agent: Quantiles::of(&agent_us),
        node_red: Quantiles::of(&node_red_us),
        bare: Quantiles::of(&bare_us),
        commit: Quantiles::of(&commit_us),
        missed,
        agent_cpu: cpu(ticks_before.0, ticks_after.0),
        node_red_cpu: cpu(ticks_before.1, ticks_after.1),
        agent_rss_kb,
        node_red_rss_kb,
        load_before,
        load_after,
        seconds: wall.as_secs_f64(),
    };
    eprintln!(
        "bench-engine:   {}: agent p50 {:.2} p99 {:.2} max {:.2} ms; Node-RED p50 {:.2} p99 {:.2} max {:.2} ms; bare p50 {:.2} p99 {:.2} ms; one commit p50 {:.2} p99 {:.2} ms; CPU agent {:.1} % Node-RED {:.1} %; RSS agent {:.1} MB Node-RED {:.1} MB; load {} → {}",
        load.label,
        result.agent.p50,
        result.agent.p99,
        result.agent.max,
        result.node_red.p50,
        result.node_red.p99,
        result.node_red.max,
        result.bare.p50,
        result.bare.p99,
        result.commit.p50,
        result.commit.p99,
        result.agent_cpu * 100.0,
        result.node_red_cpu * 100.0,
        agent_rss_kb as f64 / 1024.0,
        node_red_rss_kb as f64 / 1024.0,
        result.load_before,
        result.load_after,
    );
    Ok(result)
}

// ------------------------------------------------------------------------------------- stop

async fn api_post(
    ctx: &Ctx,
    api: &str,
    path: &str,
    operator: bool,
    body: Value,
) -> anyhow::Result<(reqwest::StatusCode, Value)> {
    let mut request = ctx.http.post(format!("{api}{path}")).json(&body);
    if operator {
        request = request.bearer_auth(OPERATOR);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = response.status();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

/// The relays of every slave of a master, from its last relay state report.
type Reports = HashMap<String, Vec<Vec<bool>>>;

fn note_report(reports: &mut Reports, topic: &str, payload: &[u8]) {
    let Some(m) = topic
        .strip_prefix("autocore/devices/")
        .and_then(|t| t.strip_suffix("/relays/state"))
    else {
        return;
    };
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return;
    };
    let slaves = v["slaves"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    s["relay_states"]
                        .as_array()
                        .map(|r| r.iter().map(|b| b == true).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    reports.insert(m.to_string(), slaves);
}

fn all_match(reports: &Reports, want: impl Fn(&[bool]) -> bool) -> bool {
    (1..=STOP_MASTERS).all(|m| {
        reports
            .get(&master(m))
            .is_some_and(|s| s.len() == SLAVES.len() && s.iter().all(|r| want(r)))
    })
}

async fn bench_stop(ctx: &Ctx, api: &str, rounds: usize) -> anyhow::Result<Vec<Figure>> {
    let sim = start_sim(sim_config(ctx, STOP_MASTERS, SLAVES.len(), 0)?);
    until_online(ctx, api, STOP_MASTERS).await?;
    let (_client, mut rx, listening) = listener(
        ctx,
        "bench-stop-watch",
        &["autocore/devices/+/relays/state"],
    )
    .await?;
    let mut reports = Reports::new();
    let mut stop_us = Vec::new();
    let mut answer_us = Vec::new();
    for round in 0..rounds {
        // Switch relays 0 and 1 of every slave on with holds, until the reports show them on.
        let on = |r: &[bool]| r.len() >= 2 && r[0] && r[1];
        let mut attempt = 0;
        loop {
            attempt += 1;
            ensure!(
                attempt <= 3,
                "round {round}: the relays did not all come on: {reports:?}"
            );
            for m in 1..=STOP_MASTERS {
                for slave in SLAVES {
                    for relay in 0..2 {
                        let body = json!({"master": master(m), "slave_mac": slave, "relay": relay, "max_seconds": 600});
                        let _ = api_post(ctx, api, "/controls/release", true, body.clone()).await;
                        let (status, answer) =
                            api_post(ctx, api, "/controls/hold", true, body).await?;
                        if !status.is_success() && attempt == 3 {
                            bail!("hold answered {status}: {answer}");
                        }
                    }
                }
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !all_match(&reports, on) && Instant::now() < deadline {
                if let Ok(Some((_, t, p))) =
                    tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
                {
                    note_report(&mut reports, &t, &p);
                }
            }
            if all_match(&reports, on) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Ok((_, t, p)) = rx.try_recv() {
            note_report(&mut reports, &t, &p);
        }
        let started = Instant::now();
        let (status, answer) = api_post(
            ctx,
            api,
            "/emergency/stop",
            false,
            json!({"reason": "benchmark", "by": "bench-engine"}),
        )
        .await?;
        let answered = started.elapsed();
        ensure!(
            status.is_success(),
            "/emergency/stop answered {status}: {answer}"
        );
        let off = |r: &[bool]| r.iter().all(|b| !b);
        let deadline = started + Duration::from_secs(10);
        let mut done = None;
        while done.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some((at, t, p))) => {
                    note_report(&mut reports, &t, &p);
                    if all_match(&reports, off) {
                        done = Some(at - started);
                    }
                }
                _ => bail!("round {round}: not every relay off 10 s after the stop: {reports:?}"),
            }
        }
        let took = done.context("no time")?;
        stop_us.push(took.as_micros() as u64);
        answer_us.push(answered.as_micros() as u64);
        let (status, answer) = api_post(
            ctx,
            api,
            "/emergency/reset",
            true,
            json!({"by": "bench-engine"}),
        )
        .await?;
        ensure!(
            status.is_success(),
            "/emergency/reset answered {status}: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    listening.abort();
    sim.stop().await;
    let ms = |v: &[u64], q: f64| percentile(v, q).unwrap_or(0) as f64 / 1000.0;
    let (s50, s99, smax) = (ms(&stop_us, 0.5), ms(&stop_us, 0.99), ms(&stop_us, 1.0));
    let (h50, h99) = (ms(&answer_us, 0.5), ms(&answer_us, 0.99));
    eprintln!(
        "bench-engine:   stop → every relay off p50 {s50:.1} ms p99 {s99:.1} ms max {smax:.1} ms; the POST answered p50 {h50:.1} ms p99 {h99:.1} ms"
    );
    Ok(vec![Figure {
        name: format!(
            "emergency stop: POST /emergency/stop → every relay off in the simulator's relay state reports ({rounds} rounds, {STOP_MASTERS} masters × {} slaves, relays 0 and 1 held on)",
            SLAVES.len()
        ),
        value: format!("p50 {s50:.1} ms, p99 {s99:.1} ms (max {smax:.1})"),
        baseline: format!("the POST's answer: p50 {h50:.1} ms, p99 {h99:.1} ms"),
        target: "(reported)".into(),
        met: None,
    }])
}

// ------------------------------------------------------------------------------------- helpers
