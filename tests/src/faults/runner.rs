//! Runs one seeded schedule on the real local stack: the agent as its own process (killed with
//! SIGKILL, or power-cut through [`super::power_cut`]), simulated masters in this process
//! (aborted and started again with their state kept), PostgREST frozen with SIGSTOP, Postgres
//! and Mosquitto restarted, radio delay and loss; under dashboard commands and sensor readings.
//! Then it waits for the drain and collects the [`History`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use firmware_protocol::message::RelayLimits;
use firmware_protocol::sim::{
    self, MasterSpec, MasterTiming, RadioControl, RadioSpec, SensorSource, SensorSpec, SimConfig,
    SlaveSpec,
};
use firmware_protocol::{DeviceId, MasterKey};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinHandle;

use super::history::{AckSeen, Actuation, CommandHistory, FINAL_STATES, History, ReadingKey};
use super::schedule::{Fault, Schedule};
use super::{checker, power_cut};
use crate::postgres::DATABASE;
use crate::{Claims, Role, Stack, StackError, StackOptions, repo_root};

/// The owner of the fixture world's agent `pi-alice` (`sql/tests/fixtures/world.sql`).
const ALICE: uuid::Uuid = uuid::Uuid::from_u128(0xa0000000_0000_0000_0000_000000000001);
const AGENT_ID: &str = "pi-alice";
/// The world's master of pi-alice, and a second one the run adds.
const MASTERS: [&str; 2] = ["ESP32_ALICE_1", "ESP32_ALICE_4"];
const SLAVES: [&str; 2] = ["14:33:5C:38:BF:60", "14:33:5C:38:BF:61"];
const RELAYS: u8 = 4;
/// A command's life, from its creation to its expiry: short enough that faults make some
/// expire, long enough that most can run.
const EXPIRY_S: std::ops::RangeInclusive<u32> = 3..=30;
/// The calm radio between faults.
const CALM_RADIO: RadioSpec = RadioSpec {
    loss_percent: 0,
    delay_ms: 5,
};

/// Set to `1` to keep the run's folder (agent database and log, simulator state, actuation
/// logs, the cloud's command rows) for a look afterwards.
pub const KEEP_ENV: &str = "AUTOCORE_FAULTS_KEEP";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the stack: {0}")]
    Stack(#[from] StackError),
    #[error("{what}: {detail}")]
    Step { what: &'static str, detail: String },
}

fn step(what: &'static str) -> impl FnOnce(String) -> RunError {
    move |detail| RunError::Step { what, detail }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub schedule: Schedule,
    /// The agent's binary (`autocore-agent-under-test`).
    pub agent_bin: PathBuf,
    /// Dashboard commands a second during the faulty time.
    pub commands_per_s: u32,
    /// How long to wait for the drain after the last heal.
    pub drain_timeout: Duration,
}

/// One run: its history and the checker's report, and a log of what the runner did.
#[derive(Debug)]
pub struct RunOutcome {
    pub history: History,
    pub report: checker::Report,
    pub log: Vec<String>,
    /// Commands the load could not insert while Postgres was away.
    pub inserts_refused: u64,
    /// The agent's log file, kept for reading after a failed check.
    pub agent_log: String,
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The agent as its own process, with the power-cut VFS under its database.
struct AgentProcess {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<std::process::Child>,
}

impl AgentProcess {
    fn start(&mut self) -> Result<(), RunError> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| RunError::Step {
                what: "open the agent's log",
                detail: e.to_string(),
            })?;
        let err = log.try_clone().map_err(|e| RunError::Step {
            what: "open the agent's log",
            detail: e.to_string(),
        })?;
        let child = std::process::Command::new(&self.bin)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .env(power_cut::ENV, "1")
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| RunError::Step {
                what: "start the agent",
                detail: format!("{}: {e}", self.bin.display()),
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no shutdown code runs.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One simulated master with its slave, run in this process until aborted.
struct Master {
    config: SimConfig,
    radio: RadioControl,
    task: Option<JoinHandle<()>>,
}

impl Master {
    fn start(&mut self) {
        let config = self.config.clone();
        self.task = Some(tokio::spawn(async move {
            let _ = sim::run(config, std::future::pending::<()>()).await;
        }));
    }

    /// Like kill -9: the task is dropped where it stands, its broker connection closes
    /// without a goodbye; its state folder and its slave's actuation log stay.
    fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `options.schedule` and judges it.
pub async fn run(options: RunOptions) -> Result<RunOutcome, RunError> {
    let schedule = options.schedule.clone();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let note = {
        let log = log.clone();
        move |line: String| {
            let line = format!("{:>7} ms  {line}", started.elapsed().as_millis());
            tracing::info!("{line}");
            if let Ok(mut l) = log.lock() {
                l.push(line);
            }
        }
    };

    let mut stack = Stack::start(StackOptions::default())?;
    let pg = stack.postgres()?;
    let fixture = repo_root().join("sql/tests/fixtures/world.sql");
    pg.psql(DATABASE, &["-q", "-f", &fixture.display().to_string()])?;
    pg.psql(
        DATABASE,
        &[
            "-q",
            "-c",
            &format!(
                "insert into public.device_status (device_id, owner_id, agent_id, mac_address)
                 values ('{}', '{ALICE}', '{AGENT_ID}', '24:6F:28:00:00:04')",
                MASTERS[1]
            ),
        ],
    )?;

    let dir = tempfile::tempdir().map_err(|e| step("a work folder")(e.to_string()))?;
    let db = dir.path().join("agent.db");
    let actuation_dir = dir.path().join("actuations");
    let state_dir = dir.path().join("sim-state");
    let masters_used = schedule.masters.clamp(1, MASTERS.len());

    // Masters: keys, broker logins, simulator configurations.
    let mut masters = Vec::new();
    let mut masters_toml = String::new();
    for (i, name) in MASTERS.iter().take(masters_used).enumerate() {
        let key_hex = crate::random_secret(32);
        let id = DeviceId::new(*name).map_err(|e| step("a master id")(e.to_string()))?;
        let key = MasterKey::from_hex(&key_hex).map_err(|e| step("a key")(e.to_string()))?;
        stack.broker_master(&id, &key)?;
        masters_toml.push_str(&format!(
            "[[masters]]\ndevice_id = \"{name}\"\nkey = \"{key_hex}\"\n"
        ));
        let radio = RadioControl::new(CALM_RADIO);
        let config = SimConfig {
            mqtt_url: Some(stack.mqtt_url()?),
            masters: vec![MasterSpec {
                id,
                key,
                slaves: vec![SlaveSpec {
                    mac: SLAVES[i]
                        .parse()
                        .map_err(|e| step("a MAC")(format!("{e}")))?,
                    relays: vec![
                        RelayLimits {
                            max_on_s: 3600,
                            boot_on: false,
                        };
                        usize::from(RELAYS)
                    ],
                }],
                sensors: vec![SensorSpec {
                    name: "ph".into(),
                    unit: Some("pH".into()),
                    source: SensorSource::Fixed(6.8),
                }],
            }],
            timing: MasterTiming {
                telemetry_interval_ms: 200,
                ..MasterTiming::default()
            },
            radio: CALM_RADIO,
            state_dir: Some(state_dir.clone()),
            actuation_log_dir: Some(actuation_dir.clone()),
            radio_control: Some(radio.clone()),
            poll: None,
        };
        masters.push(Master {
            config,
            radio,
            task: None,
        });
    }
    std::fs::create_dir_all(&actuation_dir).map_err(|e| step("the log folder")(e.to_string()))?;

    let agent_login = stack.broker_login(Role::Agent, AGENT_ID)?;
    let api_port = crate::free_port()?;
    let config_path = dir.path().join("agent.toml");
    std::fs::write(
        &config_path,
        format!(
            "[agent]\nid = \"{AGENT_ID}\"\n[store]\npath = \"{db}\"\ntelemetry_flush_ms = 100\n\
             [cloud]\nrest_url = \"{rest}\"\njwt = \"{jwt}\"\npoll_interval_ms = 200\n\
             [mqtt]\nurl = \"{mqtt}\"\nusername = \"{user}\"\npassword = \"{password}\"\nack_timeout_ms = 2000\n\
             [api]\nlisten = \"127.0.0.1:{api_port}\"\n{masters_toml}",
            db = db.display(),
            rest = stack.rest_url()?,
            jwt = stack.token(&Claims::agent(ALICE, AGENT_ID).expiring_at(
                (wall_ms() / 1000) as u64 + 6 * 3600
            )),
            mqtt = stack.mqtt_url()?,
            user = agent_login.username,
            password = agent_login.password,
        ),
    )
    .map_err(|e| step("the agent's configuration")(e.to_string()))?;
    let agent_log = dir.path().join("agent.log");
    let mut agent = AgentProcess {
        bin: options.agent_bin.clone(),
        config: config_path,
        log: agent_log.clone(),
        child: None,
    };

    // Acks as the broker carries them, for the history.
    let acks: Arc<Mutex<Vec<(String, AckSeen)>>> = Arc::default();
    let monitor = stack.broker_login(Role::Monitor, "fault-monitor")?;
    let ack_task = tokio::spawn(watch_acks(stack.mqtt_url()?, monitor, acks.clone()));

    agent.start()?;
    for m in &mut masters {
        m.start();
    }
    note(format!(
        "seed {} profile {:?}: stack, agent and {} masters up",
        schedule.seed, schedule.profile, masters_used
    ));
    wait_until_online(&stack, masters_used, Duration::from_secs(60)).await?;
    note("masters online in the cloud; load and faults begin".into());

    // Load: dashboard commands, from their own seeded stream.
    let t0 = Instant::now();
    let load_for = schedule.profile.faulty_for();
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let load = tokio::spawn(dashboard_load(
        stack.pg_url()?,
        schedule.seed ^ 0x5eed_10ad,
        options.commands_per_s.max(1),
        masters_used,
        load_for,
        refused.clone(),
    ));

    // Faults, as a timeline of begins and heals.
    let mut timeline: Vec<(Duration, bool, usize)> = Vec::new();
    for (i, s) in schedule.faults.iter().enumerate() {
        timeline.push((s.at, true, i));
        timeline.push((s.heals_at(), false, i));
    }
    timeline.sort_by_key(|(at, begin, i)| (*at, *begin, *i));
    let mut last_heal = t0;
    for (at, begin, i) in timeline {
        let fault = schedule.faults[i].fault;
        tokio::time::sleep_until((t0 + at).into()).await;
        if begin {
            note(format!("begin: {fault}"));
            if let Some(detail) = begin_fault(&fault, &mut stack, &mut agent, &mut masters, &db)? {
                note(detail);
            }
        } else {
            heal_fault(&fault, &mut stack, &mut agent, &mut masters, &db)?;
            last_heal = Instant::now();
            note(format!("healed: {fault}"));
        }
    }
    load.await
        .map_err(|e| step("the load")(e.to_string()))?
        .map_err(step("the load"))?;
    let load_end = Instant::now();
    note(format!(
        "load ended ({} inserts refused while Postgres was away)",
        refused.load(std::sync::atomic::Ordering::Relaxed)
    ));

    // The drain: every command ended in the cloud, and nothing left in the agent's outbox.
    let drain_from = last_heal.max(load_end);
    let deadline = drain_from + options.drain_timeout;
    let mut drain = None;
    let mut described = false;
    while Instant::now() < deadline {
        if drained(&stack, api_port).await {
            drain = Some(drain_from.elapsed());
            break;
        }
        // A slow drain says what it waits for, once.
        if !described && drain_from.elapsed() > SLOW_DRAIN {
            described = true;
            note(format!(
                "not drained after {} ms; waiting for: {}",
                SLOW_DRAIN.as_millis(),
                waiting_for(&stack, api_port).await
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    note(match drain {
        Some(d) => format!("drained {} ms after the last heal", d.as_millis()),
        None => format!("not drained after {} s", options.drain_timeout.as_secs()),
    });

    // Stop everything that writes, then read what happened.
    for m in &mut masters {
        m.kill();
    }
    agent.kill();
    ack_task.abort();
    let mut history = collect(&stack, &db, &actuation_dir, masters_used, &acks, dir.path())?;
    history.drain = drain;
    let report = checker::check(&history);
    if std::env::var(KEEP_ENV).as_deref() == Ok("1") {
        let kept = dir.keep();
        note(format!("work folder kept: {}", kept.display()));
    }
    let log = log.lock().map(|l| l.clone()).unwrap_or_default();
    let agent_log_text = std::fs::read_to_string(&agent_log).unwrap_or_default();
    Ok(RunOutcome {
        history,
        report,
        log,
        inserts_refused: refused.load(std::sync::atomic::Ordering::Relaxed),
        agent_log: agent_log_text,
    })
}

fn begin_fault(
    fault: &Fault,
    stack: &mut Stack,
    agent: &mut AgentProcess,
    masters: &mut [Master],
    db: &Path,
) -> Result<Option<String>, RunError> {
    match *fault {
        Fault::KillAgent { .. } => agent.kill(),
        Fault::PowerCut { .. } => {
            agent.kill();
            let undone = power_cut::cut(db).map_err(|e| step("the power cut")(e.to_string()))?;
            return Ok(Some(format!(
                "power cut undid {} unsynced writes ({} bytes)",
                undone.writes, undone.bytes
            )));
        }
        Fault::KillMaster { master, .. } => masters[master % masters.len()].kill(),
        Fault::FreezePostgrest { .. } => {
            if let Some(pid) = stack.postgrest()?.pid() {
                let _ = signal::kill(Pid::from_raw(pid as i32), Signal::SIGSTOP);
            }
        }
        Fault::RestartPostgres { .. } => stack.postgres_mut()?.stop(),
        Fault::RestartMosquitto { .. } => stack.mosquitto_mut()?.stop(),
        Fault::Radio {
            master,
            delay_ms,
            loss_percent,
            ..
        } => masters[master % masters.len()].radio.set(RadioSpec {
            loss_percent,
            delay_ms,
        }),
    }
    Ok(None)
}

fn heal_fault(
    fault: &Fault,
    stack: &mut Stack,
    agent: &mut AgentProcess,
    masters: &mut [Master],
    db: &Path,
) -> Result<(), RunError> {
    match *fault {
        Fault::KillAgent { .. } | Fault::PowerCut { .. } => {
            // A plain kill keeps every write (the page cache survives a process); only the
            // power cut applied the undo logs.
            power_cut::forget(db).map_err(|e| step("the undo logs")(e.to_string()))?;
            agent.start()?;
        }
        Fault::KillMaster { master, .. } => {
            let n = masters.len();
            masters[master % n].start();
        }
        Fault::FreezePostgrest { restart, .. } => {
            let rest = stack.postgrest_mut()?;
            if restart {
                rest.kill();
                rest.restart()?;
            } else if let Some(pid) = rest.pid() {
                let _ = signal::kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
            }
        }
        Fault::RestartPostgres { .. } => stack.postgres_mut()?.restart()?,
        Fault::RestartMosquitto { .. } => stack.mosquitto_mut()?.restart()?,
        Fault::Radio { master, .. } => masters[master % masters.len()].radio.set(CALM_RADIO),
    }
    Ok(())
}

async fn wait_until_online(
    stack: &Stack,
    masters: usize,
    timeout: Duration,
) -> Result<(), RunError> {
    let deadline = Instant::now() + timeout;
    let list = quoted(&MASTERS[..masters]);
    loop {
        let online = stack.postgres()?.psql(
            DATABASE,
            &[
                "-tA",
                "-c",
                &format!(
                    "select count(*) from device_status where is_online and device_id in ({list})"
                ),
            ],
        )?;
        if online.trim() == masters.to_string() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(RunError::Step {
                what: "masters online",
                detail: format!("{} of {masters} after {timeout:?}", online.trim()),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn quoted(items: &[&str]) -> String {
    items
        .iter()
        .map(|m| format!("'{m}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Inserts commands as the dashboard does, `per_s` a second for `lasting`; a refused insert
/// (Postgres away) is counted and the connection made again.
async fn dashboard_load(
    pg_url: String,
    seed: u64,
    per_s: u32,
    masters: usize,
    lasting: Duration,
    refused: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut every = tokio::time::interval(Duration::from_millis(1000 / u64::from(per_s)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + lasting;
    let mut client: Option<tokio_postgres::Client> = None;
    while Instant::now() < end {
        every.tick().await;
        let m = rng.gen_range(0..masters);
        let relay = rng.gen_range(0..RELAYS);
        let duration = rng.gen_range(1..=3u32);
        let expiry = rng.gen_range(EXPIRY_S);
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match tokio_postgres::connect(&pg_url, tokio_postgres::NoTls).await {
                Ok((c, connection)) => {
                    tokio::spawn(connection);
                    Some(c)
                }
                Err(_) => None,
            };
        }
        let Some(c) = &client else {
            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            continue;
        };
        let sql = format!(
            "insert into relay_commands_slave (master_device_id, slave_mac_address, relay_numbers, actions, duration_seconds, expires_at)
             values ('{}', '{}', '{{{relay}}}', '{{on}}', '{{{duration}}}', now() + interval '{expiry} seconds')",
            MASTERS[m], SLAVES[m]
        );
        if c.batch_execute(&sql).await.is_err() {
            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            client = None;
        }
    }
    Ok(())
}

/// Every ack published under `autocore/devices/+/ack`, with when it was heard.
async fn watch_acks(
    mqtt_url: String,
    login: crate::Login,
    acks: Arc<Mutex<Vec<(String, AckSeen)>>>,
) {
    use firmware_protocol::sim::rumqttc::{Event, Packet, QoS};
    let Ok(mut options) = sim::mqtt_options(&mqtt_url, &login.username) else {
        return;
    };
    options.set_credentials(login.username.as_str(), login.password.as_str());
    let (client, mut eventloop) = sim::mqtt_client(options);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client
                    .subscribe("autocore/devices/+/ack", QoS::AtLeastOnce)
                    .await;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload)
                    && let Ok(mut a) = acks.lock()
                {
                    a.push((
                        v["command_id"].as_str().unwrap_or_default().to_string(),
                        AckSeen {
                            result: v["result"].as_str().unwrap_or_default().to_string(),
                            at_ms: wall_ms(),
                        },
                    ));
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// A drain longer than this gets a note of what it waits for.
const SLOW_DRAIN: Duration = Duration::from_secs(3);

/// The commands not yet ended in the cloud (id, state, deliveries, seconds since locked) and
/// the agent's outbox by class, for the runner's log.
async fn waiting_for(stack: &Stack, api_port: u16) -> String {
    let open = match stack.postgres() {
        Ok(pg) => pg
            .psql(
                DATABASE,
                &[
                    "-tA",
                    "-c",
                    &format!(
                        "select coalesce(string_agg(format('%s %s x%s locked %ss ago', id, status, delivery_count,
                                coalesce(round(extract(epoch from now() - locked_at))::text, '-')), ', ' order by id), 'none')
                           from (select * from relay_commands_slave where status not in ({}) order by id limit 10) c",
                        quoted(&FINAL_STATES)
                    ),
                ],
            )
            .map(|o| o.trim().to_string())
            .unwrap_or_else(|e| format!("? ({e})")),
        Err(e) => format!("? ({e})"),
    };
    let outbox = match reqwest::Client::new()
        .get(format!("http://127.0.0.1:{api_port}/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
    {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .map(|v| v["outbox"].to_string())
            .unwrap_or_else(|e| format!("? ({e})")),
        Err(e) => format!("? ({e})"),
    };
    format!("open commands (first 10): {open}; agent outbox: {outbox}")
}

/// Every command ended in the cloud and the agent's outbox empty.
async fn drained(stack: &Stack, api_port: u16) -> bool {
    let Ok(pg) = stack.postgres() else {
        return false;
    };
    let open = pg.psql(
        DATABASE,
        &[
            "-tA",
            "-c",
            &format!(
                "select count(*) from relay_commands_slave where status not in ({})",
                quoted(&FINAL_STATES)
            ),
        ],
    );
    if !open.is_ok_and(|o| o.trim() == "0") {
        return false;
    }
    let health = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{api_port}/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    match health {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .is_ok_and(|v| v["outbox"]["depth"].as_u64() == Some(0)),
        Err(_) => false,
    }
}

fn collect(
    stack: &Stack,
    db: &Path,
    actuation_dir: &Path,
    masters: usize,
    acks: &Mutex<Vec<(String, AckSeen)>>,
    dump_to: &Path,
) -> Result<History, RunError> {
    let pg = stack.postgres()?;
    let list = quoted(&MASTERS[..masters]);
    let ms = |col: &str| format!("coalesce((extract(epoch from {col}) * 1000)::bigint::text, '')");
    let rows = pg.psql(
        DATABASE,
        &[
            "-tA",
            "-F",
            "|",
            "-c",
            &format!(
                "select id, master_device_id, array_to_string(relay_numbers, ','), {}, {}, {}, delivery_count, {}, {}, status, coalesce(replace(error_message, '|', '/'), ''), command_type, client_id
                   from relay_commands_slave where master_device_id in ({list}) order by id",
                ms("created_at"),
                ms("expires_at"),
                ms("locked_at"),
                ms("sent_at"),
                ms("completed_at")
            ),
        ],
    )?;
    // The cloud's rows as read, kept beside the logs for a look after the run.
    let _ = std::fs::write(dump_to.join("commands.psv"), &rows);
    let mut actuations: BTreeMap<String, Vec<Actuation>> = BTreeMap::new();
    for (i, name) in MASTERS.iter().take(masters).enumerate() {
        let id = DeviceId::new(*name).map_err(|e| step("a master id")(e.to_string()))?;
        let mac = SLAVES[i]
            .parse()
            .map_err(|e| step("a MAC")(format!("{e}")))?;
        let path = firmware_protocol::sim::state::actuation_log_path(actuation_dir, &id, mac);
        for a in firmware_protocol::sim::state::read_actuations(&path)
            .map_err(|e| step("an actuation log")(e.to_string()))?
        {
            actuations.entry(a.command_id).or_default().push(Actuation {
                relay: a.relay,
                action: a.action,
                at_ms: a.at_ms as i64,
            });
        }
    }
    let mut acks_by_command: BTreeMap<String, Vec<AckSeen>> = BTreeMap::new();
    for (id, ack) in acks.lock().map(|a| a.clone()).unwrap_or_default() {
        acks_by_command.entry(id).or_default().push(ack);
    }
    let opt = |s: &str| s.parse::<i64>().ok();
    let pi_made =
        agent_made_commands(db).map_err(|e| step("read the agent's database")(e.to_string()))?;
    let mut commands = Vec::new();
    for line in rows.lines().filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split('|').collect();
        if f.len() < 13 {
            return Err(RunError::Step {
                what: "read the commands",
                detail: format!("unexpected row {line:?}"),
            });
        }
        let id: i64 = f[0]
            .parse()
            .map_err(|_| step("a command id")(f[0].into()))?;
        // A command the Pi made (the off at the end of a duration, an all-off) went to the
        // masters under its edge id, and to the cloud as a row of its own.
        let key = match pi_made.get(f[12]) {
            Some(edge) => format!("edge:{edge}"),
            None => format!("backend:{id}"),
        };
        commands.push(CommandHistory {
            id,
            master: f[1].to_string(),
            relays: f[2].split(',').filter_map(|r| r.parse().ok()).collect(),
            created_ms: opt(f[3]).unwrap_or_default(),
            expires_ms: opt(f[4]).unwrap_or_default(),
            locked_ms: opt(f[5]),
            delivery_count: f[6].parse().unwrap_or_default(),
            sent_ms: opt(f[7]),
            completed_ms: opt(f[8]),
            status: f[9].to_string(),
            error: (!f[10].is_empty()).then(|| f[10].to_string()),
            command_type: f[11].to_string(),
            acks: acks_by_command.remove(&key).unwrap_or_default(),
            actuations: actuations.remove(&key).unwrap_or_default(),
        });
    }

    let cloud = pg.psql(
        DATABASE,
        &[
            "-tA",
            "-F",
            "|",
            "-c",
            &format!(
                "select device_id, sensor_key, round(extract(epoch from recorded_at) * 1000)::bigint
                   from telemetry_data where device_id in ({list})"
            ),
        ],
    )?;
    let in_cloud = cloud
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            Some(ReadingKey {
                device_id: f.first()?.to_string(),
                sensor_key: f.get(1)?.to_string(),
                recorded_at_ms: f.get(2)?.parse().ok()?,
            })
        })
        .collect();
    let (accepted, dropped_at_bound) =
        agent_readings(db).map_err(|e| step("read the agent's database")(e.to_string()))?;
    Ok(History {
        commands,
        readings: super::history::Readings {
            accepted,
            in_cloud,
            dropped_at_bound,
        },
        drain: None,
    })
}

/// The commands the agent made itself, by their `client_id` (the cloud row's too): their edge
/// number (the local row id is its negative).
fn agent_made_commands(db: &Path) -> rusqlite::Result<BTreeMap<String, u64>> {
    let conn = rusqlite::Connection::open(db)?;
    let mut stmt =
        conn.prepare("select client_id, -id from commands where id < 0 and client_id is not null")?;
    stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
    })?
    .collect()
}

/// The readings on the agent's disk and its count of readings dropped at the outbox bound.
fn agent_readings(db: &Path) -> rusqlite::Result<(Vec<ReadingKey>, u64)> {
    // Read-write, so that a WAL left by the killed agent is recovered as the agent would.
    let conn = rusqlite::Connection::open(db)?;
    let mut stmt =
        conn.prepare("select device_id, sensor_key, recorded_at_ms from readings_history")?;
    let readings = stmt
        .query_map([], |r| {
            Ok(ReadingKey {
                device_id: r.get(0)?,
                sensor_key: r.get(1)?,
                recorded_at_ms: r.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let dropped: i64 = conn.query_row(
        "select coalesce((select value from counters where name = 'telemetry_dropped'), 0)",
        [],
        |r| r.get(0),
    )?;
    Ok((readings, dropped.max(0) as u64))
}
