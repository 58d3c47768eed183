//! `bench-fleet`: issue 15's fleet benchmark. One local backend (Postgres 15 + PostgREST 12,
//! durable) and many simulated edge agents in this process, each a lightweight task running an
//! agent's pull loop against PostgREST with its own real JWT (minted as the tests mint them) and
//! its own HTTP connection, 10 masters each:
//!
//! - `sync`: one `sync_agent` call per tick, paced as the agent paces it (`PollPacing` with the
//!   agent's default `[cloud]` intervals), through the agent's own `Cloud` client;
//! - `per-master`: the polling the agent did before (every `poll_interval_ms` = 1 s: per master
//!   `get_and_lock_slave_commands` and `get_decision_rule_changes`, then `system_status`, and
//!   every fifth tick the configs and the macros), through the same client.
//!
//! For each mode and fleet size it measures, after a warm-up: the backend's CPU (user + system
//! time of the Postgres postmaster, every Postgres backend and PostgREST, from /proc, children
//! that exited included) per second of wall time while every agent is idle, divided by the
//! number of agents; the calls per second the fleet made; then the pickup latency of dashboard
//! commands (inserted one by one at random masters, from the insert's commit to the answer that
//! hands the command to its agent), p50 and p99.
//!
//! - `floor`: a PostgREST call of a function that returns a constant, with the same JWTs, at
//!   the idle sync's pace: what any request costs the backend, whatever it asks.
//!
//! It also states what an idle `sync_agent` call costs inside Postgres: EXPLAIN (ANALYZE,
//! BUFFERS) of it and of its one read, and the mean time of a run of idle calls in SQL.
//!
//! Environment: `AUTOCORE_FLEET_SIZES` (default `100,1000`), `AUTOCORE_FLEET_OLD_SIZES` (the
//! per-master sizes, default `100`), `AUTOCORE_FLEET_FLOOR_SIZES` (default `100`),
//! `AUTOCORE_FLEET_SECONDS` (idle window, default 20),
//! `AUTOCORE_FLEET_COMMANDS` (dashboard commands per run, default 200, over the same window).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use autocore_agent::cloud::{Cloud, CloudConfig, SyncCounters, SyncRequest, TokenSource};
use autocore_agent::config::{AgentConfig, Secret};
use autocore_agent::sync::pacing::PollPacing;
use autocore_stack::bench::{clock_ticks_per_second, env_number, percentile};
use autocore_stack::postgres::DATABASE;
use autocore_stack::{Claims, PostgresOptions, Stack, StackOptions};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const MASTERS_PER_AGENT: u32 = 10;
/// The per-master polling's fixed interval: the agent's default before sync_agent.
const OLD_POLL_INTERVAL: Duration = Duration::from_millis(1_000);
/// The per-master polling read the configs and macros every this many ticks.
const OLD_CONFIG_CHECK_POLLS: u64 = 5;
/// The per-master polling locked this many per master and call.
const OLD_LOCK_LIMIT: u32 = 5;
const WARM_UP: Duration = Duration::from_secs(6);

fn owner(agent: u32) -> Uuid {
    Uuid::from_u128(0xf1ee_0000_0000_0000_0000_0000_0000_0000 | agent as u128)
}

fn agent_id(agent: u32) -> String {
    format!("fleet-{agent}")
}

fn master_id(agent: u32, master: u32) -> String {
    format!("fleet-{agent}-m{master}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sync,
    PerMaster,
    /// The floor: a PostgREST call of a function that does nothing, at the idle sync's pace.
    Floor,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Sync => "sync_agent (one call per agent per tick)",
            Mode::PerMaster => "per-master polling (before)",
            Mode::Floor => "floor: an empty RPC through PostgREST at the idle pace",
        }
    }
}

/// What the fleet's tasks count, shared with the bench's main task.
#[derive(Default)]
struct FleetStats {
    calls: AtomicU64,
    errors: AtomicU64,
    /// Commands inserted and not yet handed out: id → when the insert committed.
    waiting: Mutex<HashMap<i64, Instant>>,
    pickups_ms: Mutex<Vec<u64>>,
}

impl FleetStats {
    fn picked_up(&self, ids: impl Iterator<Item = i64>) {
        let now = Instant::now();
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let mut pickups = self.pickups_ms.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            if let Some(at) = waiting.remove(&id) {
                pickups.push(now.duration_since(at).as_millis() as u64);
            }
        }
    }
}

/// CPU seconds (user + system) the backend's processes have used so far: the postmaster and
/// its children alive now (Postgres backends and workers), the children it reaped, and PostgREST.
fn backend_cpu_seconds(postmaster: u32, postgrest: u32) -> anyhow::Result<f64> {
    let (postgres, rest) = backend_cpu_split(postmaster, postgrest)?;
    Ok(postgres + rest)
}

/// [`backend_cpu_seconds`] as (Postgres, PostgREST).
fn backend_cpu_split(postmaster: u32, postgrest: u32) -> anyhow::Result<(f64, f64)> {
    let ticks = clock_ticks_per_second();
    let (mut postgres, mut postgrest_ticks) = (0u64, 0u64);
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] = state (3rd field), so field n is fields[n - 3].
        let ppid: u32 = fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        let number =
            |n: usize| -> u64 { fields.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
        // utime, stime, and the reaped children's cutime, cstime.
        let own = number(14) + number(15) + number(16) + number(17);
        if pid == postmaster {
            postgres += own;
        } else if pid == postgrest {
            postgrest_ticks += own;
        } else if ppid == postmaster {
            postgres += number(14) + number(15);
        }
    }
    Ok((postgres as f64 / ticks, postgrest_ticks as f64 / ticks))
}

/// The agent's own defaults for the sync's pace and batch sizes, with the `[cloud]` overrides
/// an agent would take from its environment (`AUTOCORE_CLOUD_POLL_INTERVAL_MS=950`, say).
fn agent_defaults() -> anyhow::Result<AgentConfig> {
    AgentConfig::from_toml(
        "[agent]\nid = \"fleet\"\n[store]\npath = \"/nonexistent.db\"\n[cloud]\nrest_url = \"http://127.0.0.1:9\"\njwt = \"t\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:9\"\n",
        Path::new("bench-fleet.toml"),
        std::env::vars().filter(|(k, _)| k.starts_with("AUTOCORE_CLOUD_")),
    )
    .context("parsing the agent's default configuration")
}

fn cloud_for(rest: &str, jwt: &str, timeout: Duration) -> Cloud {
    Cloud::new(
        &CloudConfig {
            rest_url: rest.to_string(),
            api_key: None,
            request_timeout: timeout,
        },
        TokenSource::Inline(Secret::new(jwt)),
    )
}

async fn sync_agent_loop(
    cloud: Cloud,
    masters: Vec<String>,
    config: Arc<AgentConfig>,
    stats: Arc<FleetStats>,
    cancel: CancellationToken,
) {
    let cfg = &config.cloud;
    let mut pacing = PollPacing::new(
        Duration::from_millis(cfg.poll_active_interval_ms()),
        Duration::from_millis(cfg.poll_interval_ms),
    );
    let mut counters = SyncCounters::default();
    let mut request_id: Option<String> = None;
    // Agents do not start in step.
    let offset = rand::thread_rng().gen_range(0..cfg.poll_interval_ms);
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = tokio::time::sleep(Duration::from_millis(offset)) => {}
    }
    loop {
        let id = request_id
            .get_or_insert_with(|| Uuid::new_v4().simple().to_string())
            .clone();
        let request = SyncRequest {
            counters,
            rule_cursors: &[],
            masters: &masters,
            limit_per_master: cfg.lock_batch_max,
            limit_total: cfg.lock_batch_total,
            timeout_seconds: cfg.lock_timeout_seconds,
            request_id: &id,
        };
        let answer = tokio::select! {
            _ = cancel.cancelled() => return,
            answer = cloud.sync(&request) => answer,
        };
        stats.calls.fetch_add(1, Ordering::Relaxed);
        match answer {
            Ok(answer) => {
                request_id = None;
                if answer.idle {
                    pacing.on_idle();
                } else {
                    if answer.carries_work() {
                        pacing.on_work();
                    } else {
                        pacing.on_idle();
                    }
                    if let Some(commands) = &answer.commands {
                        stats.picked_up(commands.iter().map(|c| c.id));
                    }
                    counters = answer.cursor.unwrap_or(counters);
                }
            }
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                pacing.on_no_answer();
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pacing.next_wait()) => {}
        }
    }
}

/// The floor: `bench_noop()` (returns a constant) every idle interval, with the agent's JWT,
/// so PostgREST's own work per request (JWT, settings, pre-request hook) is all that is paid.
async fn floor_loop(
    http: reqwest::Client,
    rest: String,
    jwt: String,
    interval: Duration,
    stats: Arc<FleetStats>,
    cancel: CancellationToken,
) {
    let offset = rand::thread_rng().gen_range(0..interval.as_millis() as u64);
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = tokio::time::sleep(Duration::from_millis(offset)) => {}
    }
    loop {
        let call = http
            .post(format!("{rest}/rpc/bench_noop"))
            .bearer_auth(&jwt)
            .header("content-type", "application/json")
            .body("{}")
            .send();
        let ok = tokio::select! {
            _ = cancel.cancelled() => return,
            answer = call => match answer {
                Ok(a) => a.status().is_success() && a.bytes().await.is_ok(),
                Err(_) => false,
            },
        };
        stats.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

async fn per_master_loop(
    cloud: Cloud,
    masters: Vec<String>,
    stats: Arc<FleetStats>,
    cancel: CancellationToken,
) {
    let offset = rand::thread_rng().gen_range(0..OLD_POLL_INTERVAL.as_millis() as u64);
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = tokio::time::sleep(Duration::from_millis(offset)) => {}
    }
    let mut tick = tokio::time::interval(OLD_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut polls: u64 = 0;
    let count = |ok: bool| {
        stats.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let since =
            autocore_agent::cloud::format_timestamp_ms(autocore_agent::shared::now_ms() - 5_000);
        let work = async {
            for master in &masters {
                let id = Uuid::new_v4().simple().to_string();
                match cloud.lock_commands(master, OLD_LOCK_LIMIT, 30, &id).await {
                    Ok(rows) => {
                        count(true);
                        stats.picked_up(rows.iter().map(|c| c.id));
                    }
                    Err(_) => count(false),
                }
                count(cloud.rule_changes(master, &since, None, 500).await.is_ok());
            }
            count(cloud.system_status().await.is_ok());
            if polls % OLD_CONFIG_CHECK_POLLS == 0 {
                count(cloud.device_configs(&masters).await.is_ok());
                count(cloud.macros().await.is_ok());
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = work => {}
        }
        polls += 1;
    }
}

struct RunFigures {
    mode: Mode,
    agents: u32,
    idle_cpu_per_s: f64,
    /// PostgREST's part of the idle CPU (the rest is Postgres).
    idle_postgrest_share: f64,
    idle_calls_per_s: f64,
    idle_errors: u64,
    busy_cpu_per_s: f64,
    inserted: usize,
    picked: usize,
    p50_ms: Option<u64>,
    p99_ms: Option<u64>,
    max_ms: Option<u64>,
}

#[allow(clippy::too_many_arguments)]
async fn run_fleet(
    mode: Mode,
    agents: u32,
    rest: &str,
    stack: &Stack,
    db: &tokio_postgres::Client,
    pids: (u32, u32),
    window: Duration,
    commands: u64,
    config: Arc<AgentConfig>,
) -> anyhow::Result<RunFigures> {
    let stats = Arc::new(FleetStats::default());
    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let timeout = Duration::from_millis(config.cloud.poll_timeout_ms());
    for a in 1..=agents {
        let jwt = stack.token(&Claims::agent(owner(a), &agent_id(a)));
        let cloud = cloud_for(rest, &jwt, timeout);
        let masters: Vec<String> = (1..=MASTERS_PER_AGENT).map(|m| master_id(a, m)).collect();
        match mode {
            Mode::Sync => tasks.spawn(sync_agent_loop(
                cloud,
                masters,
                config.clone(),
                stats.clone(),
                cancel.clone(),
            )),
            Mode::PerMaster => tasks.spawn(per_master_loop(
                cloud,
                masters,
                stats.clone(),
                cancel.clone(),
            )),
            Mode::Floor => tasks.spawn(floor_loop(
                // One client (one connection pool) per agent, as each Pi has its own.
                reqwest::Client::new(),
                rest.to_string(),
                jwt,
                Duration::from_millis(config.cloud.poll_interval_ms),
                stats.clone(),
                cancel.clone(),
            )),
        };
    }
    tokio::time::sleep(WARM_UP).await;

    // Idle: no command anywhere.
    let split0 = backend_cpu_split(pids.0, pids.1)?;
    let (cpu0, calls0, errors0, t0) = (
        split0.0 + split0.1,
        stats.calls.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(window).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let split1 = backend_cpu_split(pids.0, pids.1)?;
    let idle_cpu_per_s = (split1.0 + split1.1 - cpu0) / elapsed;
    let idle_postgrest_share = if idle_cpu_per_s > 0.0 {
        (split1.1 - split0.1) / elapsed / idle_cpu_per_s
    } else {
        0.0
    };
    let idle_calls_per_s = (stats.calls.load(Ordering::Relaxed) - calls0) as f64 / elapsed;
    let idle_errors = stats.errors.load(Ordering::Relaxed) - errors0;

    // Dashboard commands, one at a time at random masters, spread over the same window.
    let cpu1 = backend_cpu_seconds(pids.0, pids.1)?;
    let t1 = Instant::now();
    let gap = window / commands.max(1) as u32;
    let insert = db
        .prepare(
            "insert into public.relay_commands_slave
               (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds)
             values ($1, '14:33:5C:38:BF:60', '{0}', '{on}', '{5}') returning id",
        )
        .await
        .context("preparing the dashboard's insert")?;
    for _ in 0..commands {
        let (a, m) = {
            let mut rng = rand::thread_rng();
            (
                rng.gen_range(1..=agents),
                rng.gen_range(1..=MASTERS_PER_AGENT),
            )
        };
        // Timed from the insert's commit.
        let row = db
            .query_one(&insert, &[&master_id(a, m)])
            .await
            .context("inserting a dashboard command")?;
        let committed = Instant::now();
        let id: i64 = row.get(0);
        // An agent fast enough to answer before this line is not counted: a few µs.
        stats
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, committed);
        tokio::time::sleep(gap).await;
    }
    // Stragglers: at most the idle interval plus the poll timeout.
    tokio::time::sleep(Duration::from_millis(
        config.cloud.poll_interval_ms + config.cloud.poll_timeout_ms(),
    ))
    .await;
    let busy_cpu_per_s = (backend_cpu_seconds(pids.0, pids.1)? - cpu1) / t1.elapsed().as_secs_f64();
    cancel.cancel();
    while tasks.join_next().await.is_some() {}

    let pickups = stats
        .pickups_ms
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let unpicked = stats
        .waiting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len();
    // Leave nothing open for the next run.
    db.execute(
        "update public.relay_commands_slave set status = 'completed' where status in ('pending', 'processing')",
        &[],
    )
    .await
    .context("closing the run's commands")?;
    Ok(RunFigures {
        mode,
        agents,
        idle_cpu_per_s,
        idle_postgrest_share,
        idle_calls_per_s,
        idle_errors,
        busy_cpu_per_s,
        inserted: pickups.len() + unpicked,
        picked: pickups.len(),
        p50_ms: percentile(&pickups, 0.50),
        p99_ms: percentile(&pickups, 0.99),
        max_ms: pickups.iter().max().copied(),
    })
}

fn sizes(name: &str, default: &[u32]) -> anyhow::Result<Vec<u32>> {
    match std::env::var(name) {
        Err(_) => Ok(default.to_vec()),
        Ok(text) if text.trim().is_empty() => Ok(Vec::new()),
        Ok(text) => text
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=5_000).contains(n))
                    .with_context(|| format!("{name}: {s:?} is not a fleet size in 1..=5000"))
            })
            .collect(),
    }
}

/// EXPLAIN (ANALYZE, BUFFERS) of an idle call and of its one read, and the mean of 2,000 idle
/// calls in SQL, for agent 1 with the cursor its first call returned.
async fn idle_call_cost(db: &tokio_postgres::Client) -> anyhow::Result<String> {
    let claims =
        serde_json::json!({"role": "authenticated", "sub": owner(1), "agent_id": agent_id(1)});
    db.batch_execute("begin").await?;
    db.execute(
        "select set_config('request.jwt.claims', $1, true)",
        &[&claims.to_string()],
    )
    .await?;
    db.batch_execute("set local role authenticated").await?;
    let first: serde_json::Value = serde_json::from_str(
        db.query_one(
            "select public.sync_agent('{}'::jsonb, null, 50, 100, 30, null)::text",
            &[],
        )
        .await?
        .get::<_, &str>(0),
    )?;
    let cursor = first["cursor"].to_string();
    let idle: serde_json::Value = serde_json::from_str(
        db.query_one(
            "select public.sync_agent($1::text::jsonb, null, 50, 100, 30, null)::text",
            &[&cursor],
        )
        .await?
        .get::<_, &str>(0),
    )?;
    if idle != serde_json::json!({"idle": true}) {
        bail!("the second call of an untouched agent was not idle: {idle}");
    }
    let explain = |sql: String| async move {
        let rows = db.query(&sql, &[]).await?;
        anyhow::Ok(
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    };
    let call = explain(format!(
        "explain (analyze, buffers, timing off, summary on) select public.sync_agent('{cursor}'::jsonb, null, 50, 100, 30, null)"
    ))
    .await?;
    db.batch_execute("reset role").await?;
    let read = explain(format!(
        "explain (analyze, buffers, summary on) select s.* from private.agent_sync_state s
           join public.edge_agents a on a.agent_id = s.agent_id
          where s.agent_id = '{}' and a.owner_id = '{}' and a.revoked_at is null",
        agent_id(1),
        owner(1)
    ))
    .await?;
    db.batch_execute("set local role authenticated").await?;
    let statement = db
        .prepare("select public.sync_agent($1::text::jsonb, null, 50, 100, 30, null)::text")
        .await?;
    const CALLS: u32 = 2_000;
    let started = Instant::now();
    for _ in 0..CALLS {
        db.query_one(&statement, &[&cursor]).await?;
    }
    let mean_us = started.elapsed().as_secs_f64() * 1e6 / CALLS as f64;
    db.batch_execute("rollback").await?;
    Ok(format!(
        "An idle call (agent fleet-1, its cursor current), as PostgREST runs it (role authenticated, claims set):\n\n```\n{call}\n```\n\nIts one read (the agent's counters row and its live edge_agents row):\n\n```\n{read}\n```\n\n{CALLS} idle calls in SQL over one connection (no HTTP): {mean_us:.0} µs each, round trip included.\n"
    ))
}

fn main() -> anyhow::Result<()> {
    let new_sizes = sizes("AUTOCORE_FLEET_SIZES", &[100, 1_000])?;
    let old_sizes = sizes("AUTOCORE_FLEET_OLD_SIZES", &[100])?;
    let floor_sizes = sizes("AUTOCORE_FLEET_FLOOR_SIZES", &[100])?;
    let window = Duration::from_secs(env_number(
        "AUTOCORE_FLEET_SECONDS",
        20,
        "a whole number of seconds",
    )?);
    let commands = env_number("AUTOCORE_FLEET_COMMANDS", 200, "a whole number")?;
    let largest = new_sizes
        .iter()
        .chain(&old_sizes)
        .copied()
        .max()
        .unwrap_or(0);
    if largest == 0 {
        bail!("no fleet to run: AUTOCORE_FLEET_SIZES and AUTOCORE_FLEET_OLD_SIZES are both empty");
    }
    let config = Arc::new(agent_defaults()?);

    eprintln!("bench-fleet: starting a durable backend (Postgres 15 + PostgREST 12)");
    let stack = Stack::start(StackOptions {
        backend: true,
        mqtt: false,
        broker: autocore_stack::Security::Secured,
        postgres: PostgresOptions {
            durable: true,
            max_connections: 100,
        },
    })
    .context("starting the backend")?;
    let pg = stack.postgres().context("the stack has no Postgres")?;
    let pids = (
        pg.pid().context("Postgres has no pid")?,
        stack
            .postgrest()
            .context("the stack has no PostgREST")?
            .pid()
            .context("PostgREST has no pid")?,
    );
    eprintln!("bench-fleet: creating {largest} agents with {MASTERS_PER_AGENT} masters each");
    pg.psql(
        DATABASE,
        &[
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!(
                "insert into auth.users (id, email)
                   select ('f1ee0000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid, 'fleet' || g || '@example.com'
                     from generate_series(1, {largest}) g;
                 insert into public.edge_agents (agent_id, owner_id)
                   select 'fleet-' || g, ('f1ee0000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid
                     from generate_series(1, {largest}) g;
                 insert into public.device_status (device_id, owner_id, agent_id)
                   select 'fleet-' || g || '-m' || m, ('f1ee0000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid, 'fleet-' || g
                     from generate_series(1, {largest}) g, generate_series(1, {MASTERS_PER_AGENT}) m;"
            ),
        ],
    )
    .context("creating the fleet")?;
    // The floor's function, in this benchmark's database only.
    pg.psql(
        DATABASE,
        &[
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "create function public.bench_noop() returns jsonb language sql volatile as $$ select '{\"idle\": true}'::jsonb $$;
             grant execute on function public.bench_noop() to authenticated;
             notify pgrst, 'reload schema';",
        ],
    )
    .context("creating the floor's function")?;
    pg.psql(DATABASE, &["-c", "vacuum analyze"])
        .context("vacuum analyze after creating the fleet")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    let rest = stack.rest_url().context("the stack has no PostgREST")?;
    let pg_url = stack.pg_url().context("the stack has no Postgres URL")?;
    let (figures, cost) = runtime.block_on(async {
        let (db, connection) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls)
            .await
            .context("connecting to Postgres")?;
        tokio::spawn(connection);
        let cost = idle_call_cost(&db)
            .await
            .context("measuring an idle call")?;
        let mut figures = Vec::new();
        let runs = new_sizes
            .iter()
            .map(|&n| (Mode::Sync, n))
            .chain(floor_sizes.iter().map(|&n| (Mode::Floor, n)))
            .chain(old_sizes.iter().map(|&n| (Mode::PerMaster, n)));
        for (mode, n) in runs {
            eprintln!("bench-fleet: {} with {n} agents", mode.label());
            figures.push(
                run_fleet(
                    mode,
                    n,
                    &rest,
                    &stack,
                    &db,
                    pids,
                    window,
                    commands,
                    config.clone(),
                )
                .await?,
            );
        }
        anyhow::Ok((figures, cost))
    })?;

    println!("## Machine\n\n{}", autocore_stack::bench::machine_lines());
    println!(
        "load average after: {}\n",
        autocore_stack::bench::load_average()
    );
    println!(
        "Agent defaults: poll_active_interval_ms = {}, poll_interval_ms = {} (idle bound), lock_batch_max = {}, lock_batch_total = {}, poll_timeout_ms = {}. {MASTERS_PER_AGENT} masters per agent; idle window {} s after a {} s warm-up; {commands} dashboard commands per run over the same window. The fleet's client runs on the same cores as the backend.\n",
        config.cloud.poll_active_interval_ms(),
        config.cloud.poll_interval_ms,
        config.cloud.lock_batch_max,
        config.cloud.lock_batch_total,
        config.cloud.poll_timeout_ms(),
        window.as_secs(),
        WARM_UP.as_secs(),
    );
    println!("## Idle call\n\n{cost}");
    println!("## Fleet\n");
    println!(
        "| mode | agents | backend CPU s/s idle | PostgREST's part | per idle agent | CPU ms per idle call | idle agents per backend core | calls/s idle | failed calls idle | backend CPU s/s with commands | commands picked up | pickup p50 | pickup p99 | max |"
    );
    println!(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let ms = |v: Option<u64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "—".into());
    for f in &figures {
        let per_agent = f.idle_cpu_per_s / f.agents as f64;
        println!(
            "| {} | {} | {:.3} | {:.0} % | {:.5} | {:.2} | {:.0} | {:.0} | {} | {:.3} | {}/{} | {} | {} | {} |",
            f.mode.label(),
            f.agents,
            f.idle_cpu_per_s,
            f.idle_postgrest_share * 100.0,
            per_agent,
            if f.idle_calls_per_s > 0.0 {
                f.idle_cpu_per_s * 1000.0 / f.idle_calls_per_s
            } else {
                0.0
            },
            if per_agent > 0.0 {
                1.0 / per_agent
            } else {
                f64::INFINITY
            },
            f.idle_calls_per_s,
            f.idle_errors,
            f.busy_cpu_per_s,
            f.picked,
            f.inserted,
            ms(f.p50_ms),
            ms(f.p99_ms),
            ms(f.max_ms),
        );
    }
    Ok(())
}
