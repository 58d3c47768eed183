//! `autocore-demo`: the whole flow on the local stack, narrated for a person: a dashboard user
//! registers an agent and a master, sends commands through PostgREST, and the RPC hands them out
//! in order; then the real agent with a simulated ESP32 runs a dashboard command, the seed's pH
//! rule fires on the simulator's falling pH with the backend up and again with it down (the
//! records arrive when it returns), and the emergency stop holds until the operator resets it.

use anyhow::{Context, bail};
use autocore_stack::{Claims, Stack, StackOptions};
use serde_json::{Value, json};
use uuid::Uuid;

const MASTER: &str = "ESP32_HIDRO_F44738";
const SLAVE_MAC: &str = "14:33:5C:38:BF:60";
/// The slave board's relays, in the backend's registration and in the simulator.
const SLAVE_RELAYS: usize = 4;
const AGENT: &str = "pi-greenhouse";

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    step("Starting the local stack (Postgres 15, PostgREST 12, Mosquitto) on loopback");
    let mut stack = Stack::start(StackOptions::default()).context("starting the local stack")?;
    for line in stack.env_lines() {
        if !line.starts_with("AUTOCORE_JWT_SECRET") {
            println!("    {line}");
        }
    }

    // Sign-up happens in Supabase Auth; here the user row is created directly.
    let owner = Uuid::new_v4();
    stack
        .postgres()?
        .psql(
            "autocore",
            &[
                "-c",
                &format!(
                    "insert into auth.users (id, email) values ('{owner}', 'grower@example.com')"
                ),
            ],
        )
        .context("creating the dashboard user")?;
    let http = reqwest::Client::new();
    let rest = stack.rest_url()?;
    let dashboard = stack.token(&Claims::user(owner));
    let agent = stack.token(&Claims::agent(owner, AGENT));

    step("The dashboard registers a Pi agent, an ESP32 master and its slave relay board");
    post(
        &http,
        &rest,
        &dashboard,
        "/edge_agents",
        json!({"agent_id": AGENT, "owner_id": owner, "name": "greenhouse Pi"}),
    )
    .await?;
    post(
        &http,
        &rest,
        &dashboard,
        "/device_status",
        json!({"device_id": MASTER, "owner_id": owner, "agent_id": AGENT, "device_name": "Hydroponics master", "mac_address": "24:6F:28:F4:47:38"}),
    )
    .await?;
    // Registered with its real relay count: a slave the backend first meets in a completion is
    // taken to have 8 relays until it reports (the seed's markCommandCompleted does the same).
    post(
        &http,
        &rest,
        &dashboard,
        "/relay_slaves",
        json!({"master_device_id": MASTER, "slave_mac_address": SLAVE_MAC, "slave_name": "Hydroponics relays", "relay_count": SLAVE_RELAYS, "relay_states": vec![false; SLAVE_RELAYS]}),
    )
    .await?;
    println!(
        "    agent {AGENT} serves master {MASTER}; its slave board {SLAVE_MAC} has {SLAVE_RELAYS} relays, numbered 0 to {}",
        SLAVE_RELAYS - 1
    );

    step(
        "The dashboard sends three commands, in this order (#N: the row's id in relay_commands_slave)",
    );
    let commands = [
        json!({"relay_numbers": [0, 1], "actions": ["on", "on"], "duration_seconds": [30, 30], "command_type": "manual", "triggered_by": "manual", "priority": 10}),
        json!({"relay_numbers": [2], "actions": ["on"], "duration_seconds": [60], "command_type": "rule", "triggered_by": "rule", "priority": 50, "rule_id": "RULE_001", "rule_name": "Ajustar pH quando baixo"}),
        json!({"relay_numbers": [3], "actions": ["on"], "duration_seconds": [5], "command_type": "peristaltic", "triggered_by": "peristaltic", "priority": 80}),
    ];
    for mut command in commands {
        command["master_device_id"] = json!(MASTER);
        command["slave_mac_address"] = json!(SLAVE_MAC);
        let created = post(&http, &rest, &dashboard, "/relay_commands_slave", command).await?;
        println!("    {}", describe(&created[0]));
    }

    step("The agent calls get_and_lock_slave_commands: peristaltic > rule > manual, then priority");
    let locked = post(
        &http,
        &rest,
        &agent,
        "/rpc/get_and_lock_slave_commands",
        json!({"p_master_device_id": MASTER, "p_limit": 5, "p_timeout_seconds": 30}),
    )
    .await?;
    let locked = locked.as_array().context("the RPC returns an array")?;
    for (i, row) in locked.iter().enumerate() {
        println!("    {}. {}", i + 1, describe(row));
    }
    if locked.len() != 3 {
        bail!("expected 3 locked commands, got {}", locked.len());
    }

    step("Called again, the RPC hands out nothing: every command is locked");
    let again = post(
        &http,
        &rest,
        &agent,
        "/rpc/get_and_lock_slave_commands",
        json!({"p_master_device_id": MASTER}),
    )
    .await?;
    println!("    {again}");

    step("The agent completes the first command, as markCommandCompleted does");
    let first = locked[0]["id"].as_i64().context("command id")?;
    let done = post(
        &http,
        &rest,
        &agent,
        "/rpc/complete_slave_command",
        json!({"p_command_id": first, "p_execution_time_ms": 142}),
    )
    .await?;
    println!("    {}", describe(&done[0]));
    let slaves = get(
        &http,
        &rest,
        &dashboard,
        "/relay_slaves?select=slave_mac_address,relay_states",
    )
    .await?;
    println!(
        "    relay_slaves as the dashboard sees it: {} (relays 0 to {}: relay 3 on, as the command said; no board runs in this part, so the RPC applies the command to the states it knows)",
        slaves[0]["relay_states"],
        SLAVE_RELAYS - 1
    );

    step("The dashboard cancels the two commands still locked, before the real agent starts");
    for row in &locked[1..] {
        let id = row["id"].as_i64().context("command id")?;
        let cancelled = patch(
            &http,
            &rest,
            &dashboard,
            &format!("/relay_commands_slave?id=eq.{id}"),
            json!({"status": "cancelled"}),
        )
        .await?;
        println!("    {}", describe(&cancelled[0]));
    }

    edge_demo(&mut stack, &http, &dashboard, owner).await?;

    step("Done; the stack is torn down");
    Ok(())
}

const KEY_HEX: &str = "5f1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
/// The local API's operator token in this demo (a real one lives in the agent's config only).
const OPERATOR: &str = "demo-operator-token";
const RULE_COOLDOWN_S: u32 = 5;
const RULE_DURATION_S: u32 = 3;

/// Part two: the real agent and a simulated ESP32 master with one slave board.
async fn edge_demo(
    stack: &mut Stack,
    http: &reqwest::Client,
    dashboard: &str,
    owner: Uuid,
) -> anyhow::Result<()> {
    use firmware_protocol::message::RelayLimits;
    use firmware_protocol::sim::{
        self, MasterSpec, MasterTiming, RadioSpec, SensorSource, SensorSpec, SimConfig, SlaveSpec,
    };

    step(
        "Starting esp32-sim: master ESP32_HIDRO_F44738 with slave 14:33:5C:38:BF:60 (4 relays), pH drifting 6.8 -> 6.0 over 15 s (60 readings, one every 250 ms)",
    );
    let sim_config = SimConfig {
        mqtt_url: Some(stack.mqtt_url()?),
        masters: vec![MasterSpec {
            id: firmware_protocol::DeviceId::new(MASTER)?,
            key: firmware_protocol::MasterKey::from_hex(KEY_HEX)?,
            slaves: vec![SlaveSpec {
                mac: SLAVE_MAC.parse()?,
                relays: vec![
                    RelayLimits {
                        max_on_s: 600,
                        boot_on: false
                    };
                    SLAVE_RELAYS
                ],
            }],
            sensors: vec![SensorSpec {
                name: "ph".into(),
                unit: Some("pH".into()),
                source: SensorSource::Ramp {
                    from: 6.8,
                    to: 6.0,
                    steps: 60,
                },
            }],
        }],
        timing: MasterTiming {
            telemetry_interval_ms: 250,
            ..MasterTiming::default()
        },
        radio: RadioSpec {
            loss_percent: 0,
            delay_ms: 2,
        },
        state_dir: None,
        actuation_log_dir: None,
        radio_control: None,
        poll: None,
    };
    // The master logs in with its device id and the password derived from its key.
    stack.admit_sim(&sim_config)?;
    let (sim_stop, sim_stopped) = tokio::sync::oneshot::channel::<()>();
    let sim_task = tokio::spawn(sim::run(sim_config, async move {
        let _ = sim_stopped.await;
    }));

    step(
        "Starting autocore-agent for pi-greenhouse (its own SQLite, the agent's JWT, poll every 500 ms)",
    );
    let dir = tempfile::tempdir()?;
    let toml = format!(
        "[agent]\nid = \"{AGENT}\"\n[store]\npath = \"{db}\"\ntelemetry_flush_ms = 200\n\
         [cloud]\nrest_url = \"{rest}\"\njwt = \"{jwt}\"\npoll_interval_ms = 500\n\
         [mqtt]\nurl = \"{mqtt}\"\nusername = \"autocore-{AGENT}\"\npassword = \"{mqtt_password}\"\n[api]\nlisten = \"127.0.0.1:0\"\n\
         [engine]\nstale_after_ms = 10000\n[safety]\noperator_token = \"{OPERATOR}\"\n\
         [[masters]]\ndevice_id = \"{MASTER}\"\nkey = \"{KEY_HEX}\"\n",
        db = dir.path().join("agent.db").display(),
        rest = stack.rest_url()?,
        jwt = stack.token(&Claims::agent(owner, AGENT)),
        mqtt = stack.mqtt_url()?,
        mqtt_password = autocore_stack::random_secret(16),
    );
    let config = autocore_agent::config::AgentConfig::from_toml(
        &toml,
        std::path::Path::new("demo.toml"),
        std::iter::empty(),
    )?;
    // The broker admits no one else: the logins `autocore-agent broker-config` writes for this
    // configuration (the agent, and each master with its derived password).
    stack
        .mosquitto()?
        .add_users(&autocore_agent::broker::users_from_config(&config)?)?;
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let health_url = format!("http://{}/health", api.local_addr()?);
    let local_api = format!("http://{}", api.local_addr()?);
    let db = dir.path().join("agent.db");
    let (agent_stop, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_task = tokio::spawn(autocore_agent::run(config, api, async move {
        let _ = agent_stopped.await;
    }));
    println!("    local API: {health_url}");

    step(
        "The dashboard sends relay 1 on for 10 s; the agent pulls it, signs it, the master runs it",
    );
    let rest = stack.rest_url()?;
    let created = post(
        http,
        &rest,
        dashboard,
        "/relay_commands_slave",
        json!({"master_device_id": MASTER, "slave_mac_address": SLAVE_MAC, "relay_numbers": [1], "actions": ["on"], "duration_seconds": [10]}),
    )
    .await?;
    let id = created[0]["id"].as_i64().context("command id")?;
    let done = wait_for(
        http,
        &rest,
        dashboard,
        &format!("/relay_commands_slave?id=eq.{id}"),
        |rows| rows[0]["status"] == "completed",
    )
    .await?;
    println!(
        "    {}  execution {} ms (the master's measure: from receiving the command to the slave's confirmation)",
        describe(&done[0]),
        done[0]["execution_time_ms"]
    );
    let slaves = get(http, &rest, dashboard, "/relay_slaves?select=relay_states").await?;
    println!(
        "    relay states in the cloud, now from the board's signed report: {} (relay 1 on for 10 s; relay 3 is off on the real board: part one switched it on paper only)",
        slaves[0]["relay_states"]
    );

    step("The dashboard creates the seed's rule through PostgREST: pH < 6.5 -> relay 0 on");
    let rule = post(
        http,
        &rest,
        dashboard,
        "/decision_rules",
        json!({
            "device_id": MASTER, "rule_id": "RULE_001", "rule_name": "Ajustar pH quando baixo",
            "rule_json": {
                "conditions": {"type": "sensor_compare", "sensor": "ph", "operator": "<", "value": 6.5},
                "actions": [{"type": "relay_on", "slave_mac_address": SLAVE_MAC, "relay_number": 0,
                             "duration_seconds": RULE_DURATION_S}]
            },
            "priority": 50, "cooldown_seconds": RULE_COOLDOWN_S, "max_executions_per_hour": 60
        }),
    )
    .await?;
    println!(
        "    rule {} (cooldown {RULE_COOLDOWN_S} s, relay on {RULE_DURATION_S} s); the agent mirrors it and evaluates every reading",
        rule[0]["id"]
    );

    step(
        "pH falls below 6.5: the rule fires on the Pi, the slave runs it, the cloud learns afterwards",
    );
    // Two firings (the second one cooldown later, as the pH keeps falling), each with the one
    // command its one action makes, completed in the cloud.
    let mut firings = Vec::new();
    for attempt in 0.. {
        firings = firings_in_cloud(http, &rest, dashboard, i64::MAX).await?;
        if firings.len() >= 2
            && firings
                .iter()
                .all(|f| f.commands.len() == f.client_ids.len())
        {
            break;
        }
        if attempt == 150 {
            bail!("the rule did not fire twice with its commands within 30 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for firing in &firings {
        println!("    {}  {}", clock(&firing.executed_at), firing.explanation);
        for command in &firing.commands {
            println!(
                "        -> {}  triggered_by {}  rule {}",
                describe(command),
                command["triggered_by"],
                command["rule_id"]
            );
        }
    }
    println!(
        "    {} firings so far, each with its command: one action (relay 0 on {RULE_DURATION_S} s) makes one command; the next firing waits out the {RULE_COOLDOWN_S} s cooldown",
        firings.len()
    );

    step(
        "The backend goes away (PostgREST and Postgres stopped); the agent keeps control and queues",
    );
    let outage_start_ms = now_ms();
    stack.stop_backend();
    println!(
        "    the outbox gets a row for each pH reading (every 250 ms), each relay state the slave reports, and each firing: its command (relay 0 on), its execution record, and {RULE_DURATION_S} s later the Pi's own command switching relay 0 off"
    );
    for _ in 0..8 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let h: Value = http.get(&health_url).send().await?.json().await?;
        println!(
            "    backend reachable: {:<5}  outbox: {} rows waiting: {}",
            h["backend_reachable"],
            h["outbox"]["depth"],
            outbox_classes(&db)?
        );
    }
    let offline: Vec<String> = autocore_agent::store::Store::open_read_only(&db)?
        .outbox_due(i64::MAX, 10_000)?
        .into_iter()
        .filter(|r| r.payload["kind"] == "execution")
        .map(|r| clock(r.payload["row"]["executed_at"].as_str().unwrap_or("?")))
        .collect();
    if offline.is_empty() {
        println!(
            "    rule firings while the backend was away: none (the {RULE_COOLDOWN_S} s cooldown had not ended)"
        );
    } else {
        println!(
            "    rule firings while the backend was away: {} (at {}); their commands and records wait in the outbox",
            offline.len(),
            offline.join(", ")
        );
    }

    step("The backend returns; the outbox drains in order, each row once");
    stack.restart_backend().context("restarting the backend")?;
    let outage_end_ms = now_ms();
    let mut last_depth = Value::Null;
    // Everything the agent queued before the moment it reports an empty outbox is in the cloud.
    let mut drained_ms = i64::MAX;
    for _ in 0..60 {
        let asked_ms = now_ms();
        let h: Value = http.get(&health_url).send().await?.json().await?;
        last_depth = h["outbox"]["depth"].clone();
        if h["backend_reachable"] == true && h["outbox"]["depth"] == 0 {
            drained_ms = asked_ms;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    println!("    outbox depth now {last_depth}");
    let events = get(
        http,
        &rest,
        dashboard,
        "/event_logs?select=event_type,message&event_type=eq.backend_outage",
    )
    .await;
    match events {
        Ok(rows) => println!(
            "    event recorded in the cloud: {} (rows: those still waiting when the agent recorded the outage's end, its first pushes already through; dropped: readings beyond the outbox's bound)",
            rows[0]["message"]
        ),
        Err(e) => println!("    (event not visible yet: {e})"),
    }
    let readings = get(
        http,
        &rest,
        dashboard,
        "/telemetry_data?select=value&sensor_key=eq.ph&order=recorded_at.desc&limit=1",
    )
    .await?;
    println!(
        "    latest pH in the cloud: {} (the simulated pH reaches 6.0 after 15 s and stays there)",
        readings[0]["value"]
    );
    let firings = firings_in_cloud(http, &rest, dashboard, drained_ms).await?;
    let at = |f: &Firing| autocore_agent::cloud::parse_timestamp_ms(&f.executed_at).unwrap_or(0);
    let before = firings.iter().filter(|f| at(f) < outage_start_ms).count();
    let during = firings
        .iter()
        .filter(|f| (outage_start_ms..outage_end_ms).contains(&at(f)))
        .count();
    let after = firings.len() - before - during;
    let commands: usize = firings.iter().map(|f| f.commands.len()).sum();
    println!(
        "    rule firings in the cloud: {} = {before} before the outage + {during} during it (arrived with the drain) + {after} since the backend returned (the pH stays below 6.5, so the rule fires again after each {RULE_COOLDOWN_S} s cooldown)",
        firings.len()
    );
    println!(
        "    rule commands in the cloud for them: {commands}, one per firing, each once{}",
        if commands == firings.len() && firings.iter().all(|f| f.commands.len() == 1) {
            String::new()
        } else {
            " -- NOT as expected".to_string()
        }
    );
    let offs = get(
        http,
        &rest,
        dashboard,
        &format!(
            "/relay_commands_slave?select=id&command_type=eq.automation&created_at=lt.{}",
            autocore_agent::cloud::format_timestamp_ms(drained_ms)
        ),
    )
    .await?;
    println!(
        "    and {} automation commands: the Pi switching a relay off when its duration ended (relay 1 after its 10 s, relay 0 after each firing's {RULE_DURATION_S} s); they take command ids too, hence the gaps between #N",
        offs.as_array().map_or(0, |r| r.len())
    );

    step(
        "Emergency stop from the Pi's local API: every relay off on every master, all commands blocked",
    );
    let stopped: Value = http
        .post(format!("{local_api}/emergency/stop"))
        .json(&json!({"reason": "demo: water on the floor", "by": "grower"}))
        .send()
        .await?
        .json()
        .await?;
    println!("    {stopped}");
    let latched = wait_for(
        http,
        &rest,
        dashboard,
        "/system_status?select=emergency_stop,emergency_reason",
        |rows| rows[0]["emergency_stop"] == true,
    )
    .await?;
    println!("    system_status in the cloud: {}", latched[0]);
    let refused = post(
        http,
        &rest,
        dashboard,
        "/relay_commands_slave",
        json!({"master_device_id": MASTER, "slave_mac_address": SLAVE_MAC, "relay_numbers": [2], "actions": ["on"], "duration_seconds": [5]}),
    )
    .await?;
    let id = refused[0]["id"].as_i64().context("command id")?;
    let failed = wait_for(
        http,
        &rest,
        dashboard,
        &format!("/relay_commands_slave?id=eq.{id}"),
        |rows| rows[0]["status"] == "failed",
    )
    .await?;
    println!(
        "    {}  {}",
        describe(&failed[0]),
        failed[0]["error_message"].as_str().unwrap_or("")
    );
    let critical = get(
        http,
        &rest,
        dashboard,
        "/event_logs?select=severity,message&event_type=eq.emergency_stop",
    )
    .await?;
    println!(
        "    event: {} {}",
        critical[0]["severity"], critical[0]["message"]
    );

    step(
        "Reset: refused without the operator token, accepted with it; nothing switches back on by itself",
    );
    let anonymous = http
        .post(format!("{local_api}/emergency/reset"))
        .send()
        .await?;
    println!("    without the token: {}", anonymous.status());
    let reset = http
        .post(format!("{local_api}/emergency/reset"))
        .bearer_auth(OPERATOR)
        .json(&json!({"by": "grower"}))
        .send()
        .await?;
    println!(
        "    with the operator token: {} {}",
        reset.status(),
        reset.text().await?
    );
    let cleared = wait_for(
        http,
        &rest,
        dashboard,
        "/system_status?select=emergency_stop",
        |rows| rows[0]["emergency_stop"] == false,
    )
    .await?;
    println!("    system_status in the cloud: {}", cleared[0]);

    let _ = agent_stop.send(());
    let _ = sim_stop.send(());
    let _ = agent_task.await;
    let _ = sim_task.await;
    Ok(())
}

/// A rule firing as the cloud records it (`rule_executions`), with the commands it created.
struct Firing {
    executed_at: String,
    explanation: String,
    client_ids: Vec<String>,
    commands: Vec<Value>,
}

/// The firings recorded in the cloud that happened before `until_ms`, oldest first, each with
/// the rule commands (`relay_commands_slave.client_id`) its record names.
async fn firings_in_cloud(
    http: &reqwest::Client,
    rest: &str,
    token: &str,
    until_ms: i64,
) -> anyhow::Result<Vec<Firing>> {
    let rows = get(
        http,
        rest,
        token,
        "/rule_executions?select=executed_at,explanation,command_client_ids&order=executed_at",
    )
    .await?;
    let commands = get(
        http,
        rest,
        token,
        "/relay_commands_slave?select=id,client_id,command_type,triggered_by,rule_id,priority,relay_numbers,actions,status&command_type=eq.rule&order=id",
    )
    .await?;
    let commands = commands.as_array().cloned().unwrap_or_default();
    let mut firings = Vec::new();
    for row in rows.as_array().into_iter().flatten() {
        let executed_at = row["executed_at"].as_str().unwrap_or("").to_string();
        if autocore_agent::cloud::parse_timestamp_ms(&executed_at).is_none_or(|t| t >= until_ms) {
            continue;
        }
        let client_ids: Vec<String> = row["command_client_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_string))
            .collect();
        let mine = commands
            .iter()
            .filter(|c| {
                c["client_id"]
                    .as_str()
                    .is_some_and(|id| client_ids.iter().any(|mine| mine == id))
            })
            .cloned()
            .collect();
        firings.push(Firing {
            executed_at,
            explanation: row["explanation"].as_str().unwrap_or("").to_string(),
            client_ids,
            commands: mine,
        });
    }
    Ok(firings)
}

/// The outbox's rows waiting, by kind, read from the agent's SQLite.
fn outbox_classes(db: &std::path::Path) -> anyhow::Result<String> {
    use autocore_agent::store::OutboxClass;
    let stats = autocore_agent::store::Store::open_read_only(db)?.outbox_stats(now_ms())?;
    Ok(stats
        .by_class
        .iter()
        .map(|(class, n)| {
            let (one, many) = match class {
                OutboxClass::Telemetry => ("reading", "readings"),
                OutboxClass::RelayState => ("relay report", "relay reports"),
                OutboxClass::RuleCommand => ("command made on the Pi", "commands made on the Pi"),
                OutboxClass::RuleFeedback => ("execution record", "execution records"),
                OutboxClass::Completion => ("completion", "completions"),
                OutboxClass::Event => ("event", "events"),
                OutboxClass::DeviceStatus => ("presence change", "presence changes"),
            };
            format!("{n} {}", if *n == 1 { one } else { many })
        })
        .collect::<Vec<_>>()
        .join(", "))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `HH:MM:SS.mmm` (UTC) of an RFC 3339 timestamp, for a person reading the narration.
fn clock(timestamp: &str) -> String {
    let Some(ms) = autocore_agent::cloud::parse_timestamp_ms(timestamp) else {
        return timestamp.to_string();
    };
    let of_day = ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        of_day / 3_600_000,
        of_day / 60_000 % 60,
        of_day / 1000 % 60,
        of_day % 1000
    )
}

async fn wait_for(
    http: &reqwest::Client,
    rest: &str,
    token: &str,
    path: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    for _ in 0..100 {
        let rows = get(http, rest, token, path).await?;
        if done(&rows) {
            return Ok(rows);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    bail!("{path} never reached the expected state")
}

async fn patch(
    http: &reqwest::Client,
    rest: &str,
    token: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    write(http.patch(format!("{rest}{path}")), token, path, body).await
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn describe(row: &Value) -> String {
    format!(
        "#{} {:<11} priority {:>3}  relays {} {}  status {}",
        row["id"],
        row["command_type"].as_str().unwrap_or("?"),
        row["priority"],
        row["relay_numbers"],
        row["actions"],
        row["status"].as_str().unwrap_or("?"),
    )
}

async fn post(
    http: &reqwest::Client,
    rest: &str,
    token: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    write(http.post(format!("{rest}{path}")), token, path, body).await
}

/// A write as the dashboard sends it: the caller's token, the written rows back.
async fn write(
    request: reqwest::RequestBuilder,
    token: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let resp = request
        .bearer_auth(token)
        .header("Prefer", "return=representation")
        .json(&body)
        .send()
        .await
        .with_context(|| format!("writing {path}"))?;
    answer(resp, path).await
}

async fn get(http: &reqwest::Client, rest: &str, token: &str, path: &str) -> anyhow::Result<Value> {
    let resp = http
        .get(format!("{rest}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("GET {path}"))?;
    answer(resp, path).await
}

async fn answer(resp: reqwest::Response, path: &str) -> anyhow::Result<Value> {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{path}: {status}: {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}
