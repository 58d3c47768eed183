//! `bench-backend`: the command-queue benchmark of issue 3. Starts a durable backend, loads
//! sql/bench/setup.sql, and for {floor in SQL, RPC in SQL, RPC through PostgREST, batch RPC in
//! SQL, batch RPC through PostgREST} × {1, 16 lockers} reseeds a backlog of 100,000 pending commands over 50 masters (sql/bench/seed.sql),
//! locks and completes commands for a fixed time, and prints commands/s (completed rows counted
//! in the database over wall time), the RPC's fraction of the floor, and cycle latencies.
//!
//! The whole matrix runs `AUTOCORE_BENCH_ROUNDS` times (default 3); each fraction compares runs
//! of the same round, and the summary gives medians, so that one noisy moment does not decide.
//!
//! Environment: `AUTOCORE_BENCH_SECONDS` (per run, default 10), `AUTOCORE_BENCH_ROUNDS` (default
//! 3), `AUTOCORE_BENCH_LOCKERS` (comma-separated concurrency levels, default `1,16`),
//! `AUTOCORE_BENCH_VARIANTS` (comma-separated slugs: floor, rpc, rpc-rest, batch, batch-rest,
//! sync; default all), `AUTOCORE_BENCH_PEER=graphile-worker` (also runs npm graphile-worker,
//! installed on demand into target/bench-peers, batched, on the same Postgres, beside the sync
//! variant), `AUTOCORE_BENCH_EXTRA_SQL` (a SQL file applied after the backend and before measuring, to try
//! a change; the output says so).

use autocore_stack::bench::{env_number, percentile};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use autocore_stack::postgres::DATABASE;
use autocore_stack::{Claims, Postgres, PostgresOptions, Stack, StackOptions, repo_root};
use rand::Rng;
use serde_json::{Value, json};
use uuid::Uuid;

/// The bench owner and agent of sql/bench/setup.sql.
const BENCH_OWNER: Uuid = Uuid::from_u128(0xbe000000_0000_0000_0000_00000000be01);
const BENCH_AGENT: &str = "bench-agent";
/// Masters bench-master-1 ..= bench-master-50.
const MASTERS: u32 = 50;
/// Commands locked per call, as the agent and the seeds ask for.
const LOCK_LIMIT: u32 = 5;
/// The backlog seed.sql creates.
const BACKLOG: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    FloorSql,
    /// Lock, then complete_slave_command once per locked command.
    RpcSql,
    RpcRest,
    /// Lock, then one complete_slave_commands call for all the locked commands.
    BatchSql,
    BatchRest,
    /// sync_agent at the sync's batch size (100 per call over the agent's masters), then one
    /// complete_slave_commands call (decision 21).
    SyncSql,
}

impl Variant {
    const ALL: [Variant; 6] = [
        Variant::FloorSql,
        Variant::RpcSql,
        Variant::RpcRest,
        Variant::BatchSql,
        Variant::BatchRest,
        Variant::SyncSql,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::FloorSql => "floor, SQL (pgbench)",
            Variant::RpcSql => "RPC, SQL (pgbench)",
            Variant::RpcRest => "RPC, PostgREST (HTTP)",
            Variant::BatchSql => "batch RPC, SQL (pgbench)",
            Variant::BatchRest => "batch RPC, PostgREST (HTTP)",
            Variant::SyncSql => "sync_agent 100/call + batch completion, SQL (pgbench)",
        }
    }

    /// The pgbench script of a SQL variant; None for the HTTP variants.
    fn script(self) -> Option<&'static str> {
        match self {
            Variant::FloorSql => Some("floor_lock_complete.sql"),
            Variant::RpcSql => Some("rpc_lock_complete.sql"),
            Variant::BatchSql => Some("rpc_batch_lock_complete.sql"),
            Variant::SyncSql => Some("rpc_sync_lock_complete.sql"),
            Variant::RpcRest | Variant::BatchRest => None,
        }
    }

    /// A short name for pgbench's log files.
    fn slug(self) -> &'static str {
        match self {
            Variant::FloorSql => "floor",
            Variant::RpcSql => "rpc",
            Variant::RpcRest => "rpc-rest",
            Variant::BatchSql => "batch",
            Variant::BatchRest => "batch-rest",
            Variant::SyncSql => "sync",
        }
    }

    /// The table whose completed rows this variant produces.
    fn table(self) -> &'static str {
        match self {
            Variant::FloorSql => "bench.floor_queue",
            Variant::RpcSql
            | Variant::RpcRest
            | Variant::BatchSql
            | Variant::BatchRest
            | Variant::SyncSql => "public.relay_commands_slave",
        }
    }
}

/// One timed run of one variant at one concurrency.
#[derive(Debug)]
struct Run {
    round: u64,
    variant: Variant,
    lockers: usize,
    /// Lock+complete cycles that finished (pgbench transactions, or HTTP cycles).
    cycles: u64,
    /// Rows with status 'completed' in the database afterwards.
    completed: u64,
    /// Rows still pending afterwards: the backlog must not run dry during a run.
    pending_left: u64,
    wall: Duration,
    /// Latency of each lock+complete cycle, in microseconds.
    cycle_latencies_us: Vec<u64>,
}

impl Run {
    fn commands_per_second(&self) -> f64 {
        self.completed as f64 / self.wall.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> Option<f64> {
        percentile(&self.cycle_latencies_us, p).map(|us| us as f64 / 1000.0)
    }
}

fn main() -> anyhow::Result<()> {
    let seconds = env_number("AUTOCORE_BENCH_SECONDS", 10, "a whole number of seconds")?;
    let rounds = env_number("AUTOCORE_BENCH_ROUNDS", 3, "a whole number")?;
    let lockers = env_lockers("AUTOCORE_BENCH_LOCKERS", &[1, 16])?;
    let variants = env_variants("AUTOCORE_BENCH_VARIANTS")?;
    let peer = std::env::var("AUTOCORE_BENCH_PEER").ok();
    if let Some(peer) = &peer {
        ensure!(
            peer == "graphile-worker",
            "AUTOCORE_BENCH_PEER: only graphile-worker is known, got {peer:?}"
        );
    }
    let bench_dir = repo_root().join("sql/bench");

    eprintln!("bench-backend: starting a durable backend (Postgres 15 + PostgREST 12)");
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
    let pg = stack.postgres().context("the stack has no Postgres")?;
    let extra_sql = std::env::var_os("AUTOCORE_BENCH_EXTRA_SQL").map(PathBuf::from);
    if let Some(extra) = &extra_sql {
        run_sql_file(pg, extra).context("applying AUTOCORE_BENCH_EXTRA_SQL")?;
    }
    run_sql_file(pg, &bench_dir.join("setup.sql")).context("applying sql/bench/setup.sql")?;

    let machine = machine_description();
    let settings = postgres_settings(pg)?;
    let load_before = autocore_stack::bench::load_average();
    println!("## Machine\n\n{machine}");
    println!("load average before: {load_before}\n");
    println!("## Postgres\n\n{settings}\n");
    match &extra_sql {
        Some(extra) => println!(
            "NOTE: {} was applied on top of the migrations; these are not the figures of the repository's backend.\n",
            extra.display()
        ),
        None => println!(
            "Backend: sql/bootstrap + supabase/migrations as in the repository, nothing else.\n"
        ),
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime for the HTTP lockers")?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .context("building the HTTP client")?;
    let rest_url = stack.rest_url().context("the stack has no PostgREST")?;
    let token = stack.token(&Claims::agent(BENCH_OWNER, BENCH_AGENT));
    let work = tempfile::Builder::new()
        .prefix("autocore-bench-")
        .tempdir()
        .context("creating a folder for pgbench's logs")?;

    let duration = Duration::from_secs(seconds);
    let mut runs = Vec::new();
    for round in 1..=rounds {
        for &n in &lockers {
            // The variants of one concurrency run back to back, so that they share the machine's
            // conditions of the moment (this machine has 2 cores and is shared).
            for &variant in &variants {
                run_sql_file(pg, &bench_dir.join("seed.sql"))
                    .context("reseeding with sql/bench/seed.sql")?;
                pg.psql(DATABASE, &["-c", "checkpoint"])
                    .context("checkpoint before the run")?;
                eprintln!(
                    "bench-backend: round {round}/{rounds}: {} with {n} locker(s) for {seconds} s",
                    variant.label()
                );
                let mut run = match variant.script() {
                    Some(script) => run_pgbench(
                        pg,
                        variant,
                        &bench_dir.join(script),
                        n,
                        duration,
                        work.path(),
                    )?,
                    None => {
                        let batch = variant == Variant::BatchRest;
                        let (cycles, wall, latencies) = runtime
                            .block_on(run_rest(&http, &rest_url, &token, n, duration, batch))
                            .context("the PostgREST run")?;
                        Run {
                            round: 0,
                            variant,
                            lockers: n,
                            cycles,
                            completed: 0,
                            pending_left: 0,
                            wall,
                            cycle_latencies_us: latencies,
                        }
                    }
                };
                run.round = round;
                let run = count_rows(pg, run)?;
                eprintln!(
                    "bench-backend:   {} commands completed in {:.2} s = {:.0} commands/s",
                    run.completed,
                    run.wall.as_secs_f64(),
                    run.commands_per_second()
                );
                if run.pending_left < BACKLOG / 10 {
                    bail!(
                        "the backlog nearly ran dry ({} pending left) during {} with {n} lockers; shorten AUTOCORE_BENCH_SECONDS",
                        run.pending_left,
                        variant.label()
                    );
                }
                runs.push(run);
            }
        }
    }

    println!(
        "load average after: {}\n",
        autocore_stack::bench::load_average()
    );
    println!(
        "## Results ({seconds} s per run, backlog {BACKLOG} pending over {MASTERS} masters, lock limit {LOCK_LIMIT})\n"
    );
    println!("### Summary: medians over {rounds} round(s)\n");
    println!("{}", summary_table(&runs, &lockers));
    println!("### Every run\n");
    println!("{}", results_table(&runs));
    if peer.is_some() {
        let pg_url = stack.pg_url().context("the stack has no Postgres URL")?;
        println!("### Peer: graphile-worker, batched, on the same Postgres\n");
        println!(
            "{}",
            graphile_worker_table(&pg_url, &runs, &lockers, seconds)
                .context("running graphile-worker")?
        );
    }
    Ok(())
}

/// The variants named in `name` by their slugs (all when unset).
fn env_variants(name: &str) -> anyhow::Result<Vec<Variant>> {
    match std::env::var(name) {
        Err(_) => Ok(Variant::ALL.to_vec()),
        Ok(v) => v
            .split(',')
            .map(|s| {
                Variant::ALL
                    .into_iter()
                    .find(|variant| variant.slug() == s.trim())
                    .with_context(|| {
                        format!(
                            "{name}: {s:?} is none of {:?}",
                            Variant::ALL.map(Variant::slug)
                        )
                    })
            })
            .collect(),
    }
}

/// The batch size the agent's sync locks per call (`[cloud] lock_batch_total`).
const SYNC_BATCH: u32 = 100;
/// The graphile-worker release measured; installed on demand into target/bench-peers.
const GRAPHILE_WORKER: &str = "graphile-worker@0.16.6";

/// Installs graphile-worker into target/bench-peers (npm, once), runs it for each concurrency
/// (localQueue of the sync's batch size, completions batched with no delay) on a backlog as
/// large as ours, and sets its jobs/s beside the sync variant's median commands/s.
fn graphile_worker_table(
    pg_url: &str,
    runs: &[Run],
    lockers: &[usize],
    seconds: u64,
) -> anyhow::Result<String> {
    let dir = repo_root().join("target/bench-peers");
    std::fs::create_dir_all(&dir).context("creating target/bench-peers")?;
    if !dir.join("node_modules/graphile-worker").exists() {
        eprintln!(
            "bench-backend: installing {GRAPHILE_WORKER} into {}",
            dir.display()
        );
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(GRAPHILE_WORKER)
            .status()
            .context("running npm (Node.js and npm are needed for the peer)")?;
        ensure!(
            status.success(),
            "npm install {GRAPHILE_WORKER} failed ({status})"
        );
    }
    let script = dir.join("graphile-worker-bench.mjs");
    std::fs::write(
        &script,
        include_str!("../../bench-peers/graphile-worker-bench.mjs"),
    )
    .context("writing the peer's script")?;
    let mut table = format!(
        "| concurrency | graphile-worker jobs/s (localQueue {SYNC_BATCH}, completeJobBatchDelay 0) | sync_agent commands/s (median, same lockers) | ratio |\n| ---: | ---: | ---: | ---: |\n"
    );
    for &n in lockers {
        eprintln!("bench-backend: graphile-worker with concurrency {n} for {seconds} s");
        let out = Command::new("node")
            .arg(&script)
            .args([
                pg_url,
                &BACKLOG.to_string(),
                &seconds.to_string(),
                &n.to_string(),
                &SYNC_BATCH.to_string(),
            ])
            .output()
            .context("running node")?;
        ensure!(
            out.status.success(),
            "graphile-worker run failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let result: Value = serde_json::from_str(line.trim().lines().last().unwrap_or(""))
            .with_context(|| format!("reading the peer's answer {line:?}"))?;
        let peer = result["jobs_per_s"].as_f64().context("no jobs_per_s")?;
        let mut ours: Vec<f64> = runs
            .iter()
            .filter(|r| r.variant == Variant::SyncSql && r.lockers == n)
            .map(Run::commands_per_second)
            .collect();
        ours.sort_by(f64::total_cmp);
        let median = ours.get(ours.len() / 2).copied();
        table.push_str(&format!(
            "| {n} | {peer:.0} | {} | {} |\n",
            median
                .map(|m| format!("{m:.0}"))
                .unwrap_or_else(|| "—".into()),
            median
                .map(|m| format!("{:.2}", m / peer))
                .unwrap_or_else(|| "—".into()),
        ));
    }
    Ok(table)
}

/// Runs one pgbench script for `duration` with `lockers` clients and reads back the latency of
/// every transaction (one transaction = one lock+complete cycle) from pgbench's logs.
fn run_pgbench(
    pg: &Postgres,
    variant: Variant,
    script: &Path,
    lockers: usize,
    duration: Duration,
    work: &Path,
) -> anyhow::Result<Run> {
    let prefix = format!("{}-{lockers}", variant.slug());
    let threads = lockers.clamp(1, 2);
    let started = Instant::now();
    let out = Command::new(pg.bindir().join("pgbench"))
        .envs(pg.client_env())
        .current_dir(work)
        .args([
            "-n",
            "-M",
            "simple",
            "--failures-detailed",
            "-l",
            "--log-prefix",
            &prefix,
        ])
        .args(["-c", &lockers.to_string(), "-j", &threads.to_string()])
        .args(["-T", &duration.as_secs().to_string()])
        .arg("-f")
        .arg(script)
        .output()
        .with_context(|| format!("running pgbench on {}", script.display()))?;
    let wall = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "pgbench on {} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        out.status
    );
    let cycles = pgbench_field(&stdout, "number of transactions actually processed:")
        .and_then(|v| {
            v.split('/')
                .next()
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .with_context(|| format!("no transaction count in pgbench's output:\n{stdout}"))?;
    let failed = pgbench_field(&stdout, "number of failed transactions:")
        .and_then(|v| {
            v.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0);
    ensure!(
        failed == 0,
        "pgbench reported {failed} failed transactions:\n{stdout}\n{stderr}"
    );
    let latencies = read_pgbench_logs(work, &prefix)?;
    Ok(Run {
        round: 0,
        variant,
        lockers,
        cycles,
        completed: 0,
        pending_left: 0,
        wall,
        cycle_latencies_us: latencies,
    })
}

/// The text after `label` on pgbench's summary line that starts with it.
fn pgbench_field<'a>(output: &'a str, label: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix(label).map(str::trim))
}

/// Reads and removes pgbench's per-transaction logs `<prefix>.<pid>[.<thread>]`; the third field
/// of each line is the transaction's latency in microseconds.
fn read_pgbench_logs(work: &Path, prefix: &str) -> anyhow::Result<Vec<u64>> {
    let mut latencies = Vec::new();
    let dot_prefix = format!("{prefix}.");
    for entry in std::fs::read_dir(work).context("listing pgbench's logs")? {
        let path = entry.context("listing pgbench's logs")?.path();
        let is_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&dot_prefix));
        if !is_log {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for line in text.lines() {
            let latency = line
                .split_whitespace()
                .nth(2)
                .and_then(|f| f.parse::<u64>().ok())
                .with_context(|| format!("bad line in {}: {line}", path.display()))?;
            latencies.push(latency);
        }
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(latencies)
}

/// `lockers` tasks, each looping until `duration` is up: lock up to 5 commands of a random
/// master through POST /rpc/get_and_lock_slave_commands, then complete each through POST
/// /rpc/complete_slave_command, or (`batch`) all of them in one POST /rpc/complete_slave_commands.
/// Returns finished cycles, wall time and cycle latencies (µs).
async fn run_rest(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    lockers: usize,
    duration: Duration,
    batch: bool,
) -> anyhow::Result<(u64, Duration, Vec<u64>)> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..lockers {
        let http = http.clone();
        let lock_url = format!("{base}/rpc/get_and_lock_slave_commands");
        let complete_url = format!("{base}/rpc/complete_slave_command");
        let batch_url = format!("{base}/rpc/complete_slave_commands");
        let bearer = format!("Bearer {token}");
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let master = rand::thread_rng().gen_range(1..=MASTERS);
                let cycle = Instant::now();
                let locked = post_json(
                    &http,
                    &lock_url,
                    &bearer,
                    json!({
                        "p_master_device_id": format!("bench-master-{master}"),
                        "p_limit": LOCK_LIMIT,
                        "p_timeout_seconds": 30,
                    }),
                )
                .await?;
                let rows = locked
                    .as_array()
                    .context("get_and_lock_slave_commands did not return an array")?;
                let ids = rows
                    .iter()
                    .map(|row| row["id"].as_i64().context("a locked command without an id"))
                    .collect::<anyhow::Result<Vec<i64>>>()?;
                if batch {
                    if !ids.is_empty() {
                        let completions: Vec<Value> = ids
                            .iter()
                            .map(|id| {
                                json!({"command_id": id, "status": "completed", "execution_time_ms": 12})
                            })
                            .collect();
                        let done = post_json(
                            &http,
                            &batch_url,
                            &bearer,
                            json!({"p_completions": completions}),
                        )
                        .await?;
                        ensure!(
                            done.as_array().map(Vec::len) == Some(ids.len()),
                            "complete_slave_commands returned {done} for {} commands",
                            ids.len()
                        );
                    }
                } else {
                    for id in ids {
                        post_json(
                            &http,
                            &complete_url,
                            &bearer,
                            json!({"p_command_id": id, "p_execution_time_ms": 12}),
                        )
                        .await?;
                    }
                }
                latencies.push(u64::try_from(cycle.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.context("an HTTP locker panicked")??);
    }
    let wall = started.elapsed();
    Ok((all.len() as u64, wall, all))
}

async fn post_json(
    http: &reqwest::Client,
    url: &str,
    bearer: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let response = http
        .post(url)
        .header("Authorization", bearer)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("reading the answer of POST {url}"))?;
    if !status.is_success() {
        bail!("POST {url} answered {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("POST {url} answered non-JSON: {text}"))
}

/// Fills in the completed and still-pending row counts of the run's table.
fn count_rows(pg: &Postgres, mut run: Run) -> anyhow::Result<Run> {
    let sql = format!(
        "select count(*) filter (where status = 'completed'), count(*) filter (where status = 'pending') from {}",
        run.variant.table()
    );
    let out = pg
        .psql(DATABASE, &["-t", "-A", "-F", " ", "-c", &sql])
        .context("counting completed commands")?;
    let mut fields = out.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(completed)), Some(Ok(pending))) => {
            run.completed = completed;
            run.pending_left = pending;
            Ok(run)
        }
        _ => bail!("unexpected count output: {out:?}"),
    }
}

/// The run's commands/s over the floor's in the same round at the same concurrency.
fn fraction_of_floor(runs: &[Run], run: &Run) -> Option<f64> {
    runs.iter()
        .find(|r| {
            r.variant == Variant::FloorSql && r.lockers == run.lockers && r.round == run.round
        })
        .map(Run::commands_per_second)
        .filter(|f| *f > 0.0)
        .map(|f| run.commands_per_second() / f)
}

fn format_ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into())
}

/// Medians over the rounds, with the range of the fraction; latencies pooled over the rounds.
fn summary_table(runs: &[Run], lockers: &[usize]) -> String {
    let mut table = String::from(
        "| variant | lockers | commands/s (median) | fraction of SQL floor (median) | fraction min..max | cycle p50 ms | cycle p99 ms |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for &n in lockers {
        for variant in Variant::ALL {
            let mine: Vec<&Run> = runs
                .iter()
                .filter(|r| r.variant == variant && r.lockers == n)
                .collect();
            let rates: Vec<f64> = mine.iter().map(|r| r.commands_per_second()).collect();
            let fractions: Vec<f64> = mine
                .iter()
                .filter_map(|r| fraction_of_floor(runs, r))
                .collect();
            let latencies: Vec<u64> = mine
                .iter()
                .flat_map(|r| r.cycle_latencies_us.iter().copied())
                .collect();
            let pooled = |p: f64| percentile(&latencies, p).map(|us| us as f64 / 1000.0);
            let range = match (
                fractions.iter().copied().reduce(f64::min),
                fractions.iter().copied().reduce(f64::max),
            ) {
                (Some(lo), Some(hi)) => format!("{lo:.2}..{hi:.2}"),
                _ => "-".into(),
            };
            table.push_str(&format!(
                "| {} | {n} | {} | {} | {range} | {} | {} |\n",
                variant.label(),
                median(&rates).map_or("-".into(), |v| format!("{v:.0}")),
                median(&fractions).map_or("-".into(), |v| format!("{v:.2}")),
                format_ms(pooled(0.50)),
                format_ms(pooled(0.99)),
            ));
        }
    }
    table
}

fn results_table(runs: &[Run]) -> String {
    let mut table = String::from(
        "| round | variant | lockers | cycles | commands completed | wall s | commands/s | fraction of SQL floor | cycle p50 ms | cycle p99 ms |\n\
         | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for run in runs {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.0} | {} | {} | {} |\n",
            run.round,
            run.variant.label(),
            run.lockers,
            run.cycles,
            run.completed,
            run.wall.as_secs_f64(),
            run.commands_per_second(),
            fraction_of_floor(runs, run).map_or("-".into(), |v| format!("{v:.2}")),
            format_ms(run.percentile_ms(0.50)),
            format_ms(run.percentile_ms(0.99)),
        ));
    }
    table
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 0 {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

fn run_sql_file(pg: &Postgres, file: &Path) -> anyhow::Result<()> {
    pg.psql(DATABASE, &["-f", &file.display().to_string()])
        .with_context(|| format!("running {}", file.display()))?;
    Ok(())
}

fn postgres_settings(pg: &Postgres) -> anyhow::Result<String> {
    let out = pg
        .psql(
            DATABASE,
            &[
                "-t",
                "-A",
                "-c",
                "select version() union all \
                 select name || ' = ' || setting || coalesce(' ' || unit, '') from pg_settings \
                  where name in ('max_connections', 'shared_buffers', 'work_mem', 'fsync', \
                                 'synchronous_commit', 'full_page_writes', 'wal_level', \
                                 'max_wal_size', 'checkpoint_timeout', 'jit', 'wal_sync_method')",
            ],
        )
        .context("reading the Postgres settings")?;
    Ok(out
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| format!("- {l}"))
        .collect::<Vec<_>>()
        .join("\n"))
}

fn machine_description() -> String {
    format!(
        "{}\n- data folder: {}",
        autocore_stack::bench::machine_lines(),
        autocore_stack::bench::data_folder()
    )
}

fn env_lockers(name: &str, default: &[usize]) -> anyhow::Result<Vec<usize>> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|s| {
                let n: usize = s
                    .trim()
                    .parse()
                    .with_context(|| format!("{name} must list whole numbers, got {v:?}"))?;
                ensure!((1..=64).contains(&n), "{name}: {n} is not within 1..=64");
                Ok(n)
            })
            .collect(),
        Err(_) => Ok(default.to_vec()),
    }
}
