//! `bench-engine`: the decision engine's benchmarks. Starts Postgres 15 + PostgREST 12 and
//! Mosquitto on loopback, loads sql/bench/setup.sql (one owner, the agent `bench-agent`, masters
//! `bench-master-1..=50`), and measures:
//!
//! 1. reading → signed command: from a telemetry reading published to
//!    `autocore/devices/{master}/telemetry` to the signed command the in-process agent publishes on
//!    `autocore/devices/{master}/command`, with 200 rules (4 per master) and 50 simulated masters
//!    × 10 sensors at 1 Hz, beside a bare MQTT echo (publisher → Mosquitto → echo client →
//!    Mosquitto → subscriber, same payload sizes and QoS) measured in the same run, interleaved;
//! 2. the sans-I/O `Engine::on_reading` cost per reading with 10, 200 and 2,000 rules, each sensor
//!    read by 2 rules, and with every rule reading the same sensor;
//! 3. emergency stop: POST /emergency/stop on the agent's local API until the simulator's relay
//!    state reports show every relay off, 10 masters × 2 slaves.
//!
//! `--quick` (or `AUTOCORE_BENCH_QUICK=1`) runs a short version. Optional environment:
//! `AUTOCORE_BENCH_PROBES` (latency probes, default 600, quick 100), `AUTOCORE_BENCH_STOPS`
//! (emergency stop rounds, default 20, quick 5), `AUTOCORE_BENCH_ROUNDS` (engine rounds, default
//! 9, quick 3).

use autocore_stack::bench::{InProcessAgent, env_number, health, percentile};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use autocore_agent::config::AgentConfig;
use autocore_agent::rules::{Catalog, Engine, EngineSettings};
use autocore_agent::store::{Reading, RuleRecord};
use autocore_stack::postgres::DATABASE;
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
/// Masters (and their simulated boards) of the latency benchmark.
const MASTERS: usize = 50;
/// Sensors per master in the background telemetry.
const SENSORS: usize = 10;
/// Rules per master: one on the trigger, the others on background sensors (never true).
const RULES_PER_MASTER: usize = 4;
/// Masters and slaves of the emergency stop benchmark.
const STOP_MASTERS: usize = 10;

fn master(n: usize) -> String {
    format!("bench-master-{n}")
}

struct Ctx {
    rest: String,
    mqtt: String,
    agent_jwt: String,
    http: reqwest::Client,
    logins: autocore_stack::bench::BenchLogins,
}

struct Figure {
    name: String,
    value: String,
    baseline: String,
    target: String,
    met: Option<bool>,
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

    println!("## Machine\n\n{}", autocore_stack::bench::machine_lines());
    println!(
        "- load average before: {}\n- mode: {}\n",
        autocore_stack::bench::load_average(),
        if quick { "quick" } else { "full" }
    );
    let mut figures = Vec::new();

    // 2 first: in process, no services, so nothing else runs on the machine's cores meanwhile.
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
    pg.psql(DATABASE, &["-c", &rules_sql()])
        .context("inserting the rules")?;
    let ctx = Ctx {
        rest: stack.rest_url().context("the stack has no PostgREST")?,
        mqtt: stack.mqtt_url().context("the stack has no Mosquitto")?,
        agent_jwt: stack.token(&Claims::agent(BENCH_OWNER, BENCH_AGENT)),
        http: reqwest::Client::new(),
        logins: autocore_stack::bench::bench_logins(
            &stack,
            BENCH_AGENT,
            &(1..=MASTERS).map(master).collect::<Vec<_>>(),
            KEY_HEX,
            &["bench-prober", "bench-stop-watch", "bench-echo"],
        )?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let dir = tempfile::Builder::new()
        .prefix("autocore-bench-engine-")
        .tempdir()
        .context("a folder for the agent's database")?;
    let db = dir.path().join("agent.db");
    runtime.block_on(async {
        let agent = start_agent(&ctx, &db).await?;
        eprintln!("bench-engine: 2/3 reading → signed command latency ({probes} probes)");
        figures.extend(
            bench_latency(&ctx, &agent, probes)
                .await
                .context("the latency benchmark")?,
        );
        // The agent's own view of the firing path, to tell the store from the hops.
        let metrics = ctx
            .http
            .get(format!("{}/metrics", agent.api))
            .send()
            .await?
            .text()
            .await?;
        for line in metrics.lines().filter(|l| {
            (l.starts_with("autocore_agent_automation_write_seconds")
                || l.starts_with("autocore_agent_rule_firing_seconds"))
                && !l.contains("bucket")
        }) {
            eprintln!("bench-engine:   agent metric {line}");
        }
        eprintln!("bench-engine: 3/3 emergency stop ({stops} rounds)");
        figures.extend(
            bench_stop(&ctx, &agent, stops)
                .await
                .context("the emergency stop benchmark")?,
        );
        eprintln!("bench-engine: stopping the agent");
        match tokio::time::timeout(Duration::from_secs(15), agent.stop()).await {
            Ok(r) => r,
            Err(_) => {
                eprintln!(
                    "bench-engine: the agent did not stop within 15 s of its shutdown signal"
                );
                Ok(())
            }
        }
    })?;

    println!(
        "- load average after: {}\n",
        autocore_stack::bench::load_average()
    );
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

/// 4 rules per master: R0 `trigger > 0.5` switches relay 0 on; R1..R3 read background sensors
/// s1..s3 and are never true.
fn rules_sql() -> String {
    let mut values = Vec::new();
    for m in 1..=MASTERS {
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

fn agent_toml(ctx: &Ctx, db: &Path) -> String {
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
listen = "127.0.0.1:0"
[safety]
operator_token = "{OPERATOR}"
"#,
        db = db.display(),
        rest = ctx.rest,
        jwt = ctx.agent_jwt,
        mqtt = ctx.mqtt,
        login = ctx.logins.agent_toml(),
    );
    for m in 1..=MASTERS {
        toml.push_str(&format!(
            "[[masters]]\ndevice_id = \"{}\"\nkey = \"{KEY_HEX}\"\n",
            master(m)
        ));
    }
    toml
}

async fn start_agent(ctx: &Ctx, db: &Path) -> anyhow::Result<InProcessAgent> {
    let config = AgentConfig::from_toml(
        &agent_toml(ctx, db),
        Path::new("bench-engine.toml"),
        std::iter::empty(),
    )
    .context("the agent's configuration")?;
    InProcessAgent::start(config, &ctx.http).await
}

async fn until_online(ctx: &Ctx, agent: &InProcessAgent, masters: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = health(&ctx.http, &agent.api).await?;
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

/// An MQTT client whose incoming publications arrive, timestamped, on the returned receiver.
async fn listener(
    ctx: &Ctx,
    id: &str,
    filters: &[&str],
) -> anyhow::Result<(
    rumqttc::AsyncClient,
    mpsc::UnboundedReceiver<(Instant, String, Vec<u8>)>,
)> {
    let options = ctx.logins.tool_options(&ctx.mqtt, id)?;
    let (client, mut eventloop) = sim::mqtt_client(options);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready) = oneshot::channel();
    tokio::spawn(async move {
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
    Ok((client, rx))
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

fn probe_payload(ts_ms: i64, value: f64) -> String {
    json!({"v": 1, "ts_ms": ts_ms, "trigger": {"value": value, "unit": "x"}}).to_string()
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

async fn bench_latency(
    ctx: &Ctx,
    agent: &InProcessAgent,
    probes: usize,
) -> anyhow::Result<Vec<Figure>> {
    let sim = start_sim(sim_config(ctx, MASTERS, 1, SENSORS)?);
    until_online(ctx, agent, MASTERS).await?;
    let (client, mut rx) = listener(
        ctx,
        "bench-prober",
        &["autocore/devices/+/command", "autocore/bench/echo/out/+"],
    )
    .await?;
    let mut stamps = Stamps(HashMap::new());
    let tel = |m: usize| format!("autocore/devices/{}/telemetry", master(m));
    let cmd = |m: usize| format!("autocore/devices/{}/command", master(m));

    // Warm-up: every master's trigger rule fires once (the mirror and the engine have the rules).
    let mut command_len = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    for m in 1..=MASTERS {
        loop {
            ensure!(
                Instant::now() < deadline,
                "master {m}'s trigger rule did not fire within 90 s of start"
            );
            let got = round_trip(
                &client,
                &mut rx,
                &tel(m),
                probe_payload(stamps.next(m), 1.0),
                &cmd(m),
                Duration::from_secs(1),
            )
            .await?;
            client
                .publish(
                    tel(m),
                    rumqttc::QoS::AtMostOnce,
                    false,
                    probe_payload(stamps.next(m), 0.0),
                )
                .await?;
            if let Some((_, len)) = got {
                command_len = len;
                break;
            }
        }
    }
    eprintln!("bench-engine:   every trigger rule fired once; a command is {command_len} bytes");
    let echo = start_echo(ctx, command_len).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut agent_us = Vec::new();
    let mut bare_us = Vec::new();
    let mut missed = 0;
    let started = Instant::now();
    for i in 0..probes {
        let m = i % MASTERS + 1;
        let pause = rand::thread_rng().gen_range(30..60);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let ts = stamps.next(m);
        match round_trip(
            &client,
            &mut rx,
            &tel(m),
            probe_payload(ts, 1.0),
            &cmd(m),
            Duration::from_secs(2),
        )
        .await?
        {
            Some((d, _)) => agent_us.push(d.as_micros() as u64),
            None => missed += 1,
        }
        client
            .publish(
                tel(m),
                rumqttc::QoS::AtMostOnce,
                false,
                probe_payload(stamps.next(m), 0.0),
            )
            .await?;
        let pause = rand::thread_rng().gen_range(30..60);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let bare = round_trip(
            &client,
            &mut rx,
            &format!("autocore/bench/echo/in/{}", master(m)),
            probe_payload(ts, 1.0),
            &format!("autocore/bench/echo/out/{}", master(m)),
            Duration::from_secs(2),
        )
        .await?
        .context("the bare echo did not answer in 2 s")?;
        bare_us.push(bare.0.as_micros() as u64);
    }
    let wall = started.elapsed();
    echo.abort();
    sim.stop().await;
    ensure!(
        missed * 100 <= probes,
        "{missed} of {probes} probes got no command"
    );
    let ms = |v: &[u64], q: f64| percentile(v, q).unwrap_or(0) as f64 / 1000.0;
    let (a50, a99, amax) = (ms(&agent_us, 0.5), ms(&agent_us, 0.99), ms(&agent_us, 1.0));
    let (b50, b99, bmax) = (ms(&bare_us, 0.5), ms(&bare_us, 0.99), ms(&bare_us, 1.0));
    eprintln!(
        "bench-engine:   reading → command p50 {a50:.2} ms p99 {a99:.2} ms max {amax:.2} ms ({missed} missed); bare echo p50 {b50:.2} ms p99 {b99:.2} ms max {bmax:.2} ms; {:.0} s",
        wall.as_secs_f64()
    );
    Ok(vec![
        Figure {
            name: format!(
                "reading → signed command over MQTT ({} probes interleaved with the bare echo; {MASTERS} simulated masters × {SENSORS} sensors at 1 Hz; {} rules; {missed} probes without a command in 2 s)",
                agent_us.len(),
                MASTERS * RULES_PER_MASTER
            ),
            value: format!("p50 {a50:.2} ms, p99 {a99:.2} ms (max {amax:.2})"),
            baseline: format!(
                "p50 {b50:.2} ms, p99 {b99:.2} ms (max {bmax:.2}): bare echo, QoS 0 in, QoS 1 out, {command_len}-byte reply"
            ),
            target: "p99 < 5 ms".into(),
            met: Some(a99 < 5.0),
        },
        Figure {
            name: "engine share of the reading → command latency (agent − bare echo)".into(),
            value: format!("p50 {:.2} ms, p99 {:.2} ms", a50 - b50, a99 - b99),
            baseline: "-".into(),
            target: "< 1 ms".into(),
            met: Some(a99 - b99 < 1.0),
        },
    ])
}

// ------------------------------------------------------------------------------------- stop

async fn api_post(
    ctx: &Ctx,
    agent: &InProcessAgent,
    path: &str,
    operator: bool,
    body: Value,
) -> anyhow::Result<(reqwest::StatusCode, Value)> {
    let mut request = ctx.http.post(format!("{}{path}", agent.api)).json(&body);
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

async fn bench_stop(
    ctx: &Ctx,
    agent: &InProcessAgent,
    rounds: usize,
) -> anyhow::Result<Vec<Figure>> {
    let sim = start_sim(sim_config(ctx, STOP_MASTERS, SLAVES.len(), 0)?);
    until_online(ctx, agent, STOP_MASTERS).await?;
    let (_client, mut rx) = listener(
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
                        let _ = api_post(ctx, agent, "/controls/release", true, body.clone()).await;
                        let (status, answer) =
                            api_post(ctx, agent, "/controls/hold", true, body).await?;
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
            agent,
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
            agent,
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
